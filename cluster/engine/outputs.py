"""Request outputs (vLLM-style) and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per generated token: top-n plus the chosen
    error: str | None = None  # why an aborted sequence could not be served
    # the error is this request's alone (the engine serves others): an internal error, not
    # "unavailable"
    error_is_internal: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # per prompt position: {token id: logprob} of the prompt token and the top
    # ``prompt_logprobs`` (None at position 0); None when not asked for
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class Delta:
    """What one step added to one completion (for streaming callers)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    # with a choice's first token: its prompt's logprobs (as RequestOutput's), if asked for
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Detokenizer:
    """Turns a growing list of token ids into text deltas, incrementally.

    Each update decodes only the tokens added since the last one, beside the group of
    tokens before them as context (a tokenizer may render a token differently at the start
    of a text: a leading space, a byte of a multi-byte character), so a whole generation
    costs linear, not quadratic, decoding. New tokens whose text ends in an incomplete UTF-8
    sequence (the tokenizer's U+FFFD) wait for the next token; given several at once (a
    resumed output arrives whole), those before that character are taken, so the text is
    the one a token-by-token update would have reached. Text is only released once
    it is stable: never the last characters that could still turn out to be the start of a
    stop string; stop strings are searched for only where new text could complete one.
    """

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens  # no stop string ends an output shorter than this
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (stop string cut off when found)
        self.emitted = 0  # characters of self.text already released
        self._prefix = 0  # first token of the context decoded beside the new ones
        self._read = 0  # tokens whose text is in self.text
        self._checked = 0  # output length at the last update (shorter ends were tried then)
        self._tokens: list[int] = []  # the output tokens (the caller's live list)
        self._stopped = False

    def update(self, token_ids: list[int]) -> str | None:
        """Decode the output tokens not decoded yet; returns the stop string if one appeared."""
        if self.tokenizer is None:  # a weights-only checkpoint: token ids, no text
            return None
        self._tokens = token_ids
        end, checked = len(token_ids), self._checked
        self._checked = end
        window = self._window(token_ids, end)
        # the tokens of a character still incomplete at the end wait; the ones before it are
        # text now (else a resumed output, cut inside a character, would decode to nothing
        # and its caller's text would be released to it again). Only ends not tried before:
        # token by token, each update tries one
        while window is not None and window.endswith("\ufffd") \
                and end - 1 > max(self._read, checked):
            end -= 1
            window = self._window(token_ids, end)
        if window is None or window.endswith("\ufffd"):
            return None  # an incomplete character (or nothing visible yet): wait
        searched_from = max(0, len(self.text) - self.hold)
        self.text += window
        self._prefix, self._read = self._read, end
        if len(token_ids) < self.min_tokens:
            return None
        found = [(at, stop) for stop in self.stop
                 if (at := self.text.find(stop, searched_from)) != -1]
        if found:
            at, stop = min(found)
            self.text = self.text[:at]
            self._stopped = True
            return stop
        return None

    def _window(self, token_ids: list[int], end: int | None = None) -> str | None:
        """The text the tokens after ``_read`` (up to ``end``) add, decoded beside their
        context; None when they add nothing visible."""
        decode = self.tokenizer.decode
        context = decode(token_ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(token_ids[self._prefix:end], skip_special_tokens=True)
        return window[len(context):] if len(window) > len(context) else None

    def release(self, final: bool) -> str:
        if final and not self._stopped and self.tokenizer is not None \
                and self._read < len(self._tokens):  # the end: even an incomplete character
            self.text += self._window(self._tokens) or ""
            self._read = len(self._tokens)
        end = len(self.text)
        if not final:
            end = max(self.emitted, end - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
