"""Typed messages between the driver and the workers, with msgpack codecs.

Every step the driver encodes one :class:`StepPlan` and sends the same bytes to
every worker; the worker that samples (last pipeline stage, TP rank 0) answers
with a :class:`StepResult`. Both carry ``PROTOCOL_VERSION`` so that a worker
running a different shardlm fails loudly instead of misreading a plan.

A sequence's sampling parameters travel once per worker gang (the plan that first names the
sequence carries them in ``samplers``, with its compiled grammar in ``grammars`` where the
gang has not got it yet) and the workers keep them until a plan ``drop``s the sequence. The
sampling rank keeps the tokens of a sequence whose sampling needs them
(:meth:`SamplerParams.needs_history`): each chunk adds its own, and only a chunk starting
past what the gang holds carries the tokens before it (``history``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 7

# A decode chunk's token id when the driver planned the step before the previous one came
# back (async scheduling): "the token your previous step sampled for this sequence".
FOLLOW = -1


class ProtocolError(ValueError):
    """A message that cannot be decoded (wrong version or shape)."""


@dataclass
class SamplerParams:
    """The part of a request's sampling parameters the sampling kernel needs."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: no limit
    min_p: float = 0.0
    seed: int = 0  # always set: the engine draws one when the request gives none
    logprobs: int | None = None  # top-n logprobs to return, None for none
    prompt_logprobs: int | None = None  # top-n logprobs of each prompt position, None for none
    repetition_penalty: float = 1.0  # on tokens of the prompt and the output; 1: off
    frequency_penalty: float = 0.0  # times each token's count in the output; 0: off
    presence_penalty: float = 0.0  # once per token in the output; 0: off
    logit_bias: list[list] | None = None  # [[token id, bias], ...]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[list[int]] | None = None  # token sequences whose last token is banned
    # [key, end token ids]: the compiled grammar the output follows (the plan's ``grammars``
    # carry it under that key; the end tokens are all it allows once complete), None for none
    grammar: list | None = None

    def to_list(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.min_p, self.seed, self.logprobs,
                self.prompt_logprobs, self.repetition_penalty, self.frequency_penalty,
                self.presence_penalty, self.logit_bias, self.allowed_token_ids, self.bad_words,
                self.grammar]

    @classmethod
    def from_list(cls, v: list) -> "SamplerParams":
        return cls(*v)

    def needs_history(self) -> bool:
        """Whether sampling reads the sequence's tokens so far: a penalty, a bad word of
        several tokens, or a grammar (its matcher is rebuilt from them wherever it is lost)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0 or bool(self.grammar)
                or any(len(w) > 1 for w in self.bad_words or []))


@dataclass
class SeqChunk:
    """One sequence's work in one step: compute ``token_ids`` at positions
    ``start_pos ..`` writing their KV through ``block_table``; sample one token
    after the last of them when ``sample`` is true. ``token_ids == [FOLLOW]``: the
    token the previous step sampled for this sequence (not yet known to the driver).
    ``prompt_targets``: score the prompt (the sequence's ``prompt_logprobs``): the prompt
    token that follows each of the first ``len(prompt_targets)`` positions of this chunk.
    ``history``: the sequence's tokens before this chunk, sent only where the gang keeps its
    tokens (:meth:`SamplerParams.needs_history`) and holds fewer than ``start_pos`` of them (a
    new gang, a prompt served from the prefix cache); ``banned``: token ids it may not sample
    now (EOS and stop tokens before ``min_tokens``). ``draft`` (speculative decoding, with
    ``sample``): the chunk's last ``draft`` tokens are guesses; the token after each of its last
    ``draft + 1`` tokens is sampled, and the guesses up to the first one that differs from the
    token sampled before it are kept, with the token sampled after the last kept one (the step
    returns those ``kept + 1`` tokens, in order)."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    prompt_targets: list[int] | None = None
    history: list[int] | None = None
    banned: list[int] | None = None
    draft: int = 0

    def to_list(self) -> list:
        return [self.seq_id, self.token_ids, self.start_pos, self.block_table, self.sample,
                self.prompt_targets, self.history, self.banned, self.draft]

    @classmethod
    def from_list(cls, v: list) -> "SeqChunk":
        return cls(*v)


@dataclass
class SeqParams:
    """A sequence's sampling parameters and prompt length, sent to a gang once (a later
    copy replaces them)."""

    seq_id: int
    prompt_len: int
    sampler: SamplerParams

    def to_list(self) -> list:
        return [self.seq_id, self.prompt_len, self.sampler.to_list()]

    @classmethod
    def from_list(cls, v: list) -> "SeqParams":
        seq_id, prompt_len, sampler = v
        return cls(seq_id, prompt_len, SamplerParams.from_list(sampler))


@dataclass
class StepPlan:
    """One step: ``chunks``; before them, ``grammars`` ([key, end token ids, the compiled
    grammar serialized] the gang does not hold yet), ``samplers`` (the parameters of
    sequences new to the gang) and ``drop`` (sequences the gang may forget: finished or
    aborted)."""

    step_id: int
    chunks: list[SeqChunk]
    samplers: list[SeqParams] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    grammars: list[list] = field(default_factory=list)

    def encode(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, "plan", self.step_id,
                              [c.to_list() for c in self.chunks],
                              [p.to_list() for p in self.samplers], self.drop, self.grammars])

    @classmethod
    def decode(cls, data: bytes) -> "StepPlan":
        step_id, chunks, samplers, drop, grammars = _open(data, "plan")
        return cls(step_id, [SeqChunk.from_list(c) for c in chunks],
                   [SeqParams.from_list(p) for p in samplers], drop, grammars)


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None  # the chosen token's logprob when asked for
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first

    def to_list(self) -> list:
        top = None if self.top_logprobs is None else [list(t) for t in self.top_logprobs]
        return [self.seq_id, self.token_id, self.logprob, top]

    @classmethod
    def from_list(cls, v: list) -> "SampledToken":
        seq_id, token_id, logprob, top = v
        return cls(seq_id, token_id, logprob, None if top is None else [tuple(t) for t in top])


@dataclass
class PromptScores:
    """Logprobs of a prompt's own tokens (a chunk's ``prompt_targets``): the one at
    ``positions[i]`` is the logprob of the prompt token there given the tokens before it."""

    seq_id: int
    first_position: int  # the position of the first scored token (its chunk's start + 1)
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]  # per position: (token id, logprob) best first

    def to_list(self) -> list:
        return [self.seq_id, self.first_position, self.logprobs,
                [[list(t) for t in top] for top in self.top_logprobs]]

    @classmethod
    def from_list(cls, v: list) -> "PromptScores":
        seq_id, first, logprobs, top = v
        return cls(seq_id, first, logprobs, [[tuple(t) for t in row] for row in top])


@dataclass
class StepResult:
    """A step's sampled tokens, in its chunks' order (several for a chunk with a ``draft``:
    its kept guesses and the token after them), its prompt scores and its experts' load."""

    step_id: int
    tokens: list[SampledToken]
    prompt_scores: list[PromptScores] = field(default_factory=list)
    # Mixture-of-Experts models: [layer, tokens routed to each expert] of each sparse layer
    # this step (from TP rank 0 of each pipeline stage: the stages' results are merged)
    expert_load: list[list] = field(default_factory=list)

    def encode(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, "result", self.step_id,
                              [t.to_list() for t in self.tokens],
                              [s.to_list() for s in self.prompt_scores], self.expert_load])

    @classmethod
    def decode(cls, data: bytes) -> "StepResult":
        step_id, tokens, scores, expert_load = _open(data, "result")
        return cls(step_id, [SampledToken.from_list(t) for t in tokens],
                   [PromptScores.from_list(s) for s in scores], expert_load)


def kept_guesses(draft: list[int], target: list[int]) -> int:
    """How many of a chunk's guesses (``draft``) the step keeps: the length of the longest
    prefix of them that agrees with ``target``, the token sampled at each of those places
    (``target`` has one token more than ``draft``: the token sampled after the kept guesses,
    at the first place that disagreed or past the last guess, joins them)."""
    if len(target) != len(draft) + 1:
        raise ValueError(f"kept_guesses: {len(draft)} guesses need {len(draft) + 1} target "
                         f"tokens, got {len(target)}")
    kept = 0
    while kept < len(draft) and draft[kept] == target[kept]:
        kept += 1
    return kept


def _open(data: bytes, kind: str) -> list:
    try:
        version, got_kind, *body = msgpack.unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"cannot decode a shardlm {kind} message: {exc}") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: got {version}, this process speaks {PROTOCOL_VERSION}; "
            "driver and workers must run the same shardlm")
    if got_kind != kind:
        raise ProtocolError(f"expected a {kind} message, got {got_kind!r}")
    return body
