"""Typed messages between the driver and the workers, with msgpack codecs.

Every step the driver encodes one :class:`StepPlan` and sends the same bytes to
every worker; the worker that samples (last pipeline stage, TP rank 0) answers
with a :class:`StepResult`. Both carry ``PROTOCOL_VERSION`` so that a worker
running a different shardlm fails loudly instead of misreading a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 2

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

    def to_list(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.min_p, self.seed, self.logprobs]

    @classmethod
    def from_list(cls, v: list) -> "SamplerParams":
        return cls(*v)


@dataclass
class SeqChunk:
    """One sequence's work in one step: compute ``token_ids`` at positions
    ``start_pos ..`` writing their KV through ``block_table``; sample one token
    after the last of them when ``sample`` is true. ``token_ids == [FOLLOW]``: the
    token the previous step sampled for this sequence (not yet known to the driver)."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampler: SamplerParams = field(default_factory=SamplerParams)

    def to_list(self) -> list:
        return [self.seq_id, self.token_ids, self.start_pos, self.block_table, self.sample,
                self.sampler.to_list()]

    @classmethod
    def from_list(cls, v: list) -> "SeqChunk":
        seq_id, token_ids, start_pos, block_table, sample, sampler = v
        return cls(seq_id, token_ids, start_pos, block_table, sample, SamplerParams.from_list(sampler))


@dataclass
class StepPlan:
    step_id: int
    chunks: list[SeqChunk]

    def encode(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, "plan", self.step_id,
                              [c.to_list() for c in self.chunks]])

    @classmethod
    def decode(cls, data: bytes) -> "StepPlan":
        step_id, chunks = _open(data, "plan")
        return cls(step_id, [SeqChunk.from_list(c) for c in chunks])


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
class StepResult:
    step_id: int
    tokens: list[SampledToken]

    def encode(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, "result", self.step_id,
                              [t.to_list() for t in self.tokens]])

    @classmethod
    def decode(cls, data: bytes) -> "StepResult":
        step_id, tokens = _open(data, "result")
        return cls(step_id, [SampledToken.from_list(t) for t in tokens])


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
