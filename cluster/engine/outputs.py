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


@dataclass
class Delta:
    """What one step added to one completion (for streaming callers)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is only released once it is stable: never while it ends in an
    incomplete UTF-8 sequence (the tokenizer's U+FFFD), and never the last
    characters that could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (stop string cut off when found)
        self.emitted = 0  # characters of self.text already released

    def update(self, token_ids: list[int]) -> str | None:
        """Decode all output tokens; returns the stop string if one appeared."""
        if self.tokenizer is None:  # a weights-only checkpoint: token ids, no text
            return None
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        found = [(at, stop) for stop in self.stop if (at := text.find(stop)) != -1]
        if found:
            at, stop = min(found)
            self.text = text[:at]
            return stop
        self.text = text
        return None

    def release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            end = max(self.emitted, end - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
