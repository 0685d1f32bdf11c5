"""User-facing sampling parameters (vLLM-compatible names and defaults).

:class:`SamplingParams` is what a request carries; it is validated on
construction so that a bad request fails at admission with a typed error
(:class:`~cluster.contract.errors.RequestError`, also a ``TypeError`` for a wrong type)
that names the field and the value. :meth:`SamplingParams.to_sampler` narrows it to the
:class:`~cluster.contract.messages.SamplerParams` the sampling kernel needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from cluster.contract.errors import UNKNOWN_PARAMETER, RequestError, RequestTypeError
from cluster.contract.messages import SamplerParams

_U64 = (1 << 64) - 1
# the longest stop string: a stream holds back that many characters less one (they could be
# the start of a stop string), and each new piece of text is searched that far back
MAX_STOP_LENGTH = 512
# the longest lists a request may give (each row's parameters go to the workers and are
# applied every step): logit_bias entries; stop strings, stop token ids and bad words; and
# allowed_token_ids (more than any vocabulary has)
MAX_LOGIT_BIAS = 1024
MAX_LIST = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar of at most 1 MiB of text


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM's ``StructuredOutputsParams`` names it: exactly one
    of ``json`` (a JSON schema, as a dict or its text), ``regex`` (the whole output matches
    it), ``choice`` (the output is one of these strings), ``grammar`` (an EBNF grammar in the
    GBNF dialect, rule ``root`` first) or ``json_object`` (any JSON object).
    ``disable_any_whitespace``: JSON without whitespace between tokens."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError("structured_outputs needs exactly one of "
                               f"{', '.join(STRUCTURED_KINDS)}; got "
                               f"{', '.join(given) or 'none'}", "structured_outputs")
        if isinstance(self.json, dict):
            self.json = _dumps(self.json)
        for name in ("json", "regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise RequestTypeError(f"structured_outputs.{name} must be a non-empty string"
                                       f"{' or an object' if name == 'json' else ''}, got {v!r}",
                                       name)
            if v is not None and len(v) > MAX_GRAMMAR_CHARS:
                raise RequestError(f"structured_outputs.{name} must be at most "
                                   f"{MAX_GRAMMAR_CHARS} characters, got {len(v)}", name)
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except ValueError as exc:
                raise RequestError(f"structured_outputs.json is not valid JSON: {exc}",
                                   "json") from None
            if not isinstance(schema, dict):
                raise RequestError("structured_outputs.json must be a JSON schema object, got "
                                   f"{type(schema).__name__}", "json")
        if self.choice is not None:
            c = self.choice
            if not isinstance(c, (list, tuple)) or not c or not all(
                    isinstance(x, str) and x for x in c):
                raise RequestTypeError("structured_outputs.choice must be a non-empty list of "
                                       f"non-empty strings, got {c!r}", "choice")
            self.choice = list(c)
        for name in ("json_object", "disable_any_whitespace"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise RequestTypeError(f"structured_outputs.{name} must be a bool", name)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def spec(self) -> list:
        """[kind, source, compact]: what the sampling rank compiles (``source`` is the schema
        or regex or grammar text, the list of choices, or None for ``json_object``)."""
        kind = self.kind
        return [kind, None if kind == "json_object" else getattr(self, kind),
                self.disable_any_whitespace]

    @classmethod
    def from_dict(cls, d: object) -> "StructuredOutputsParams":
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise RequestTypeError(f"structured_outputs must be a mapping, got "
                                   f"{type(d).__name__}", "structured_outputs")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise RequestError(f"unknown structured_outputs field(s): {', '.join(unknown)}; "
                               f"accepted: {', '.join(known)}", unknown[0], UNKNOWN_PARAMETER)
        return cls(**d)


def _check_length(values, most: int, name: str) -> None:
    if len(values) > most:
        raise RequestError(f"{name} may hold at most {most} entries, got {len(values)}", name)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass
class SamplingParams:
    """How to sample one request's completion.

    ``top_k`` of 0 or -1 disables top-k; ``top_p`` of 1 and ``min_p`` of 0
    disable those filters; ``temperature`` 0 means greedy. ``seed`` makes the
    request reproducible; when it is None the engine draws one (and keeps it,
    so a replay after a failure produces the same tokens). ``logprobs`` asks
    for the sampled token's logprob plus the ``logprobs`` most likely tokens;
    ``prompt_logprobs`` the same for every prompt token after the first (the
    prompt is then computed whole, without the prefix cache).

    As vLLM defines them: ``repetition_penalty`` (> 0, 1 off) divides a positive logit
    (multiplies a negative one) of every token already in the prompt or the output;
    ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2]) subtract their value times a
    token's count in the output, and once if it is there at all; ``logit_bias`` (token id ->
    value in [-100, 100]) is added to the logits; ``min_tokens``: EOS, the stop token ids and
    the stop strings cannot end the output before that many tokens; ``allowed_token_ids``:
    only these may be sampled; ``bad_words``: a word's last token is not sampled where the
    output ends with the tokens before it (each word tokenized as it is and after a space).
    ``structured_outputs``: a grammar the output must follow (:class:`StructuredOutputsParams`,
    or a dict of its fields); the sampled tokens are those the grammar allows, and once it is
    complete only the tokens that end the output (EOS, ``stop_token_ids``).
    Logprobs are of the raw logits.
    ``stop`` is normalised to a list of strings, ``stop_token_ids`` to a list.
    """

    n: int = 1
    max_tokens: int | None = 16  # None: as many as the context leaves after the prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None
    # the bad words as token-id sequences, made by the engine's tokenizer at admission
    _bad_words_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._check_int("n", minimum=1)
        if self.max_tokens is not None:
            self._check_int("max_tokens", minimum=1)
        self._check_int("top_k", minimum=-1)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            v = getattr(self, name)
            if not _is_number(v):
                raise RequestTypeError(f"{name} must be a number, got {type(v).__name__} {v!r}",
                                       name)
            setattr(self, name, float(v))
        if not self.temperature >= 0.0:  # also rejects NaN
            raise RequestError(f"temperature must be non-negative, got {self.temperature}",
                               "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not 0.0 < self.repetition_penalty <= 100.0:  # also rejects NaN
            raise RequestError(f"repetition_penalty must be in (0, 100], got "
                               f"{self.repetition_penalty}", "repetition_penalty")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        self._check_int("min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                               f"({self.max_tokens})", "min_tokens")
        self.logit_bias = self._normalise_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            ids = self._normalise_stop_ids(self.allowed_token_ids, "allowed_token_ids",
                                           MAX_ALLOWED_TOKEN_IDS)
            if not ids:
                raise RequestError("allowed_token_ids must not be empty", "allowed_token_ids")
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                raise RequestTypeError(f"bad_words must be a list of strings, got {words!r}",
                                       "bad_words")
            if any(not w.strip() for w in words):
                raise RequestError(f"bad_words must not hold empty words, got {list(words)!r}",
                                   "bad_words")
            _check_length(words, MAX_LIST, "bad_words")
            self.bad_words = list(words) or None
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.seed is not None:
            if not _is_int(self.seed):
                raise RequestTypeError(f"seed must be an integer or None, got "
                                       f"{type(self.seed).__name__} {self.seed!r}", "seed")
            if not -(1 << 63) <= self.seed <= _U64:
                raise RequestError(f"seed must fit in 64 bits, got {self.seed}", "seed")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                self._check_int(name, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise RequestTypeError(f"ignore_eos must be a bool, got "
                                   f"{type(self.ignore_eos).__name__} {self.ignore_eos!r}",
                                   "ignore_eos")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_ids(self.stop_token_ids)

    def _check_int(self, name: str, minimum: int) -> None:
        v = getattr(self, name)
        if not _is_int(v):
            raise RequestTypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}", name)
        if v < minimum:
            raise RequestError(f"{name} must be at least {minimum}, got {v}", name)

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestTypeError(f"stop must be a string or a list of strings, got {stop!r}",
                                   "stop")
        if any(s == "" for s in stop):
            raise RequestError(f"stop must not contain empty strings, got {list(stop)!r}", "stop")
        _check_length(stop, MAX_LIST, "stop")
        longest = max(len(s) for s in stop) if stop else 0
        if longest > MAX_STOP_LENGTH:
            raise RequestError(f"each stop string must be at most {MAX_STOP_LENGTH} characters, "
                               f"got one of {longest}", "stop")
        return list(stop)

    @staticmethod
    def _normalise_bias(bias: object) -> dict[int, float] | None:
        """Token id (an int, or its decimal string as JSON keys are) -> float in [-100, 100]."""
        if bias is None or bias == {}:
            return None
        if not isinstance(bias, dict):
            raise RequestTypeError(f"logit_bias must map token ids to numbers, got {bias!r}",
                                   "logit_bias")
        _check_length(bias, MAX_LOGIT_BIAS, "logit_bias")
        out = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
            if not _is_int(token) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            if not _is_number(value) or not -100.0 <= value <= 100.0:
                raise RequestError(f"logit_bias values must be numbers in [-100, 100], got "
                                   f"{value!r} for {key!r}", "logit_bias")
            out[token] = float(value)
        return out

    @staticmethod
    def _normalise_stop_ids(ids: object, name: str = "stop_token_ids",
                            most: int = MAX_LIST) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise RequestTypeError(f"{name} must be a list of integers, got {ids!r}"[:300], name)
        _check_length(ids, most, name)
        if not all(_is_int(t) for t in ids):
            raise RequestTypeError(f"{name} must be a list of integers, got {ids!r}"[:300], name)
        if any(t < 0 for t in ids):
            raise RequestError(f"{name} must be non-negative, got {list(ids)!r}", name)
        return list(ids)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a JSON-like dict, rejecting names this class does not know."""
        if not isinstance(d, dict):
            raise RequestTypeError(f"sampling parameters must be a mapping, got "
                                   f"{type(d).__name__}", "params")
        known = [f.name for f in fields(cls) if not f.name.startswith("_")]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise RequestError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                               f"accepted: {', '.join(known)}", unknown[0], UNKNOWN_PARAMETER)
        return cls(**d)

    def to_sampler(self, seed: int, end_ids: list[int] | None = None,
                   grammar_key: str | None = None) -> SamplerParams:
        """The kernel's view of these parameters, with ``seed`` (the request's
        seed, or the one the engine drew for it) reduced to an unsigned 64-bit
        value. ``top_k`` 0 is mapped to -1 (off). ``end_ids``: the tokens that end the
        output (EOS unless ignored, stop token ids), which a complete grammar allows;
        ``grammar_key``: the name of the structured output's compiled grammar."""
        return SamplerParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if self.top_k in (0, -1) else self.top_k,
            min_p=self.min_p,
            seed=int(seed) & _U64,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=None if not self.logit_bias else [[t, b] for t, b in self.logit_bias.items()],
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self._bad_words_ids,
            grammar=None if self.structured_outputs is None
            else [grammar_key, list(end_ids or [])],
        )
