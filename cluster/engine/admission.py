"""Admission: the one place a request is checked and turned into sequences.

Every front door (the offline ``LLM``, client handles, the HTTP API, batch jobs) reaches
:meth:`Admission.admit` through ``Engine.add_request``. A request that cannot be served
fails here with a typed :class:`~cluster.contract.errors.RequestError` naming the input at
fault, before anything is queued, and the engine goes on serving the others.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace

from cluster.contract.errors import (CONTEXT_LENGTH_EXCEEDED, DUPLICATE_REQUEST_ID, RequestError,
                                     RequestTypeError, lone_surrogate)
from cluster.contract.sampling import SamplingParams
from cluster.engine import chat
from cluster.engine.outputs import CompletionOutput, Detokenizer, RequestOutput
from cluster.engine.sequence import Sequence

_U64 = (1 << 64) - 1
_SEED_STRIDE = 0x9E3779B97F4A7C15  # the n completions of one request draw from distinct seeds


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[Detokenizer]
    outputs: list[CompletionOutput]
    arrival_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None  # when its latest token arrived (for TTFT/TPOT metrics)
    # per prompt position: {token id: logprob} of the prompt token there and the top
    # prompt_logprobs (None at position 0, and until scored); None when not asked for
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def snapshot(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             self.outputs, self.finished,
                             max(s.num_cached_tokens for s in self.seqs), self.prompt_logprobs)


class Admission:
    """Checks requests against the model (vocabulary, context length, tokenizer)."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, detokenize: bool = True):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.detokenizer_tokenizer = tokenizer if detokenize else None  # None: token ids only

    def admit(self, request_id: str, seq_ids, prompt=None, params=None, prompt_token_ids=None,
              messages=None, priority: int = 0, tokenized: list[int] | None = None,
              tools: list | None = None) -> Request:
        """A checked request with its sequences (not yet queued). ``tokenized``: the prompt's
        ids as :meth:`prompt_ids` made them beforehand (off the engine thread)."""
        params = sampling_params(params)
        ids = tokenized if tokenized is not None else self.prompt_ids(prompt, prompt_token_ids,
                                                                      messages, tools)
        params = self._bounded(self._resolved(params), ids)
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = [Sequence(next(seq_ids), list(ids), params,
                         seed=(base_seed + i * _SEED_STRIDE) & _U64, priority=priority)
                for i in range(params.n)]
        request = Request(request_id, prompt, list(ids), params, seqs,
                          [Detokenizer(self.detokenizer_tokenizer, params.stop, params.min_tokens)
                           for _ in seqs],
                          [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None)
                           for i in range(params.n)])
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(ids)
        return request

    def prompt_ids(self, prompt, prompt_token_ids, messages=None, tools=None) -> list[int]:
        """The prompt as token ids, from exactly one of text, token ids or chat messages (with
        the ``tools`` they may call)."""
        given = [name for name, v in (("prompt", prompt), ("prompt_token_ids", prompt_token_ids),
                                      ("messages", messages)) if v is not None]
        if tools is not None and messages is None:
            raise RequestError("tools go with chat messages only", "tools")
        if len(given) != 1:
            raise RequestError("give exactly one of prompt, prompt_token_ids and messages"
                               + (f" (got {', '.join(given)})" if given else ""),
                               given[-1] if given else "prompt")
        param = given[0]
        if messages is not None:
            ids = self.chat_token_ids(messages, tools)
        elif prompt is not None:
            ids = self._encode(prompt)
        else:
            ids = self._checked_ids(prompt_token_ids)
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds "
                               f"{self.max_model_len} (max_model_len), including at least one "
                               "generated token", param, CONTEXT_LENGTH_EXCEEDED)
        return list(ids)

    def _bounded(self, params: SamplingParams, ids: list[int]) -> SamplingParams:
        """``params`` with ``max_tokens`` the context's room when it is None; a RequestError
        naming both numbers when the prompt and ``max_tokens`` do not fit the context."""
        room = self.max_model_len - len(ids)
        if params.max_tokens is None:
            return replace(params, max_tokens=room)
        if params.max_tokens > room:
            raise RequestError(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{len(ids) + params.max_tokens} tokens, over the context of {self.max_model_len} "
                "(max_model_len); lower max_tokens or shorten the prompt", "max_tokens",
                CONTEXT_LENGTH_EXCEEDED)
        return params

    def _resolved(self, params: SamplingParams) -> SamplingParams:
        """``params`` checked against the model: the token ids it names inside the vocabulary,
        its bad words as token ids."""
        self._check_vocabulary(params.logit_bias or [], "logit_bias")
        self._check_vocabulary(params.allowed_token_ids or [], "allowed_token_ids")
        if params.bad_words:
            params = replace(params, _bad_words_ids=self._bad_word_ids(params.bad_words))
        return params

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids as it is and after a space (how it reads mid-text), as
        vLLM tokenizes them."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no bad_words", "bad_words")
        out: list[list[int]] = []
        for word in words:
            check_text(word, "bad_words")
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer(text, add_special_tokens=False).input_ids
                if ids and ids not in out:
                    out.append(ids)
        return out

    def chat_token_ids(self, messages, tools: list | None = None,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       add_special_tokens: bool = False) -> list[int]:
        """A conversation rendered with the tokenizer's chat template (and ``tools``, see
        :mod:`cluster.engine.chat`), as token ids. The other options are for ``POST
        /tokenize`` (a request's prompt takes the defaults): where the text ends (see
        :func:`cluster.engine.chat.render`), and the tokenizer's special tokens (e.g. BOS)
        added on top of the template's."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no chat template", "messages")
        text = chat.render(self.tokenizer, messages, tools, add_generation_prompt,
                           continue_final_message)
        check_text(text, "messages")
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def text_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text as token ids, as a prompt is tokenized (with the tokenizer's special tokens,
        e.g. BOS, unless ``add_special_tokens`` is false)."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: give prompt_token_ids", "prompt")
        check_text(text, "prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, ids) -> str:
        """Token ids (of the model's vocabulary, else a RequestError naming ``tokens``) as text,
        special tokens included, as ``tokenizer.decode`` gives it."""
        self._check_vocabulary(ids, "tokens")
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no text", "tokens")
        return self.tokenizer.decode(list(ids))

    def _encode(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise RequestTypeError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        return self.text_ids(prompt)

    def _checked_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise RequestError("prompt_token_ids must be a non-empty list of token ids",
                               "prompt_token_ids")
        self._check_vocabulary(ids, "prompt_token_ids")
        return list(ids)

    def _check_vocabulary(self, ids, name: str) -> None:
        """A RequestError naming ``name`` when any of ``ids`` is not a token id of the model."""
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"{name} hold ids outside the vocabulary "
                               f"[0, {self.vocab_size}): {bad[:5]}", name)


def check_text(text: str, name: str) -> None:
    """A RequestError naming ``name`` where ``text`` is not Unicode a tokenizer can read (a
    lone surrogate: the tokenizer would fail on it with a TypeError)."""
    wrong = lone_surrogate(text) if isinstance(text, str) else None
    if wrong:
        raise RequestError(f"{name} is not valid Unicode text: {wrong}", name)


def wait_grammar(future, limit: float):
    """The compiled grammar of a :meth:`Engine.grammar` future, waiting at most ``limit``
    seconds; a RequestError naming the structured output when it cannot be compiled or takes
    longer."""
    try:
        return future.result(timeout=limit)
    except BaseException as exc:
        raise grammar_error(exc, limit) from None


def grammar_error(exc: BaseException, limit: float) -> BaseException:
    """The RequestError a client gets for a grammar that failed to compile (``exc``, or a
    TimeoutError past ``limit`` seconds); any other error as it is."""
    from layers.grammar import GrammarError

    if isinstance(exc, TimeoutError):
        return RequestError(f"structured_outputs: the grammar did not compile within {limit:g} s "
                            "(scheduler.grammar_compile_timeout_s); simplify it",
                            "structured_outputs")
    if isinstance(exc, GrammarError):
        return RequestError(f"structured_outputs: {exc}", exc.kind or "structured_outputs")
    return exc


def sampling_params(params) -> SamplingParams:
    """A request's sampling parameters: a SamplingParams, a dict of them by name, or None."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams.from_dict(params)
    raise RequestTypeError(f"sampling_params must be SamplingParams or a dict, got "
                           f"{type(params).__name__}", "sampling_params")


def check_request_id(request_id, known) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise RequestTypeError(f"request_id must be a non-empty string, got {request_id!r}",
                               "request_id")
    if request_id in known:
        raise RequestError(f"request_id {request_id!r} is already in use", "request_id",
                           DUPLICATE_REQUEST_ID)
