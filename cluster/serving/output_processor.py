"""The engine service's output thread: callers' events made off the engine thread.

The engine thread hands over token ids as its steps produce them (the service's engine
keeps no text: ``Engine(config, detokenize=False)``); this thread turns them into text
incrementally (:class:`cluster.engine.outputs.Detokenizer`: only the new tail is decoded),
looks for stop strings, renders logprobs with their token texts, and sends each caller its
events (:mod:`cluster.contract.events`). So a request with a long output, 64 choices or
20 logprobs per token costs this thread, never the step loop that every stream waits on.

A stop string found here ends its choice for the caller at once (the delta carries
``finish_reason`` "stop", the text cut before the stop string); the engine is told to stop
the sequence (``on_stop``, queued to the engine thread), and tokens it generated meanwhile
are dropped. Only the token that completed the stop string counts, as if the engine had
found it.

Each request is handled alone: a failure while rendering one request's output becomes that
request's error event (and it is aborted through ``on_error``); the others go on.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable

from cluster.contract import events
from cluster.contract.errors import EngineUnavailable, ServiceError
from cluster.engine.outputs import CompletionOutput, Delta, Detokenizer, RequestOutput
from cluster.serving.output_events import delta_event, final_event, prompt_entries

log = logging.getLogger("shardlm.outputs")


class _Choice:
    """One completion as its caller has seen it."""

    def __init__(self, tokenizer, stop: list[str], keep_logprobs: bool, min_tokens: int = 0):
        self.detok = Detokenizer(tokenizer, stop, min_tokens)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if keep_logprobs else None
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # a stop string found here
        self.started = False  # its first event sent (it carries the echo)


class _Tracked:
    """One open request: where its events go and what each choice has sent."""

    def __init__(self, request, target, keep_logprobs: bool, echo: bool, tokenizer):
        self.request_id = request.request_id
        self.top_n = request.params.logprobs
        self.prompt_top_n = request.params.prompt_logprobs
        self.target = target  # (event loop, asyncio.Queue) of the caller's generate()
        keep = keep_logprobs and self.top_n is not None
        self.choices = [_Choice(tokenizer, request.params.stop, keep, request.params.min_tokens)
                        for _ in request.seqs]
        self.echo = echo
        self.prompt, self.prompt_ids = request.prompt, request.prompt_token_ids
        self.prompt_logprobs = None  # rendered once (cluster.serving.output_events)

    def resume(self, sent: list[tuple[list[int], str | None]]) -> None:
        """Tokens its caller already has from a lost engine: taken as this choice's output
        (their text rebuilt, nothing sent); their logprobs are the caller's (NaN here)."""
        for choice, (token_ids, finish_reason) in zip(self.choices, sent):
            if not token_ids and finish_reason is None:
                continue
            choice.token_ids, choice.started = token_ids, True
            choice.detok.update(token_ids)
            choice.text = choice.detok.release(final=finish_reason is not None)
            choice.finish_reason = finish_reason
            if choice.logprobs is not None:
                choice.logprobs = [{t: math.nan} for t in token_ids]


class OutputProcessor:
    """Owns the callers' streams of one engine service (see the module docstring).

    ``on_stop(request_id, index, stop)``: a stop string ended that choice (stop its
    sequence); ``on_error(request_id)``: the request's output could not be made (abort it).
    Both are called on this processor's thread."""

    def __init__(self, tokenizer, on_stop: Callable[[str, int, str], None],
                 on_error: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_stop, self.on_error = on_stop, on_error
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._thread = threading.Thread(target=self._run, name="shardlm-outputs", daemon=True)
        self._thread.start()

    @property
    def open_streams(self) -> int:
        return len(self._tracked)

    # ---- called on the engine thread: each only queues ---------------------------------------
    def open(self, request, target, keep_logprobs: bool, echo: bool = False) -> None:
        """A request just admitted (``request``: the engine's Request) and its caller;
        ``echo``: each choice's first event and the final one carry the prompt's text."""
        tracked = _Tracked(request, target, keep_logprobs, echo, self.tokenizer)
        sent = [(list(seq.output_token_ids), out.finish_reason)
                for seq, out in zip(request.seqs, request.outputs)]
        self._inbox.put((self._open, (tracked, sent)))

    def step(self, deltas: list[Delta]) -> None:
        if deltas:
            self._inbox.put((self._step, (deltas,)))

    def finish(self, output: RequestOutput) -> None:
        """The engine is done with the request (its sequences ended or failed)."""
        self._inbox.put((self._finish, (output,)))

    def close(self, request_id: str) -> None:
        """The caller went away: forget the request, send nothing more."""
        self._inbox.put((self._close, (request_id,)))

    # ---- this thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            handler, args = self._inbox.get()
            handler(*args)

    def _open(self, tracked: _Tracked, sent: list) -> None:
        try:
            tracked.resume(sent)
        except Exception as exc:
            self._fail(tracked, exc)
            return
        self._tracked[tracked.request_id] = tracked

    def _close(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)

    def _step(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            tracked = self._tracked.get(delta.request_id)
            if tracked is None:  # closed, or failed here
                continue
            try:
                event = self._on_delta(tracked, delta)
            except Exception as exc:
                self._fail(tracked, exc)
                continue
            if event is not None:
                self._send(tracked, event)

    def _on_delta(self, tracked: _Tracked, delta: Delta) -> dict | None:
        """The caller's delta event for one engine delta (None: that choice already ended)."""
        choice = tracked.choices[delta.index]
        if choice.finish_reason is not None:  # stopped here: the engine's later tokens drop
            return None
        reason = delta.finish_reason
        if delta.token_ids:
            choice.token_ids += delta.token_ids
            stop = choice.detok.update(choice.token_ids)
            if stop is not None and reason in (None, "length"):  # EOS, stop ids win
                if reason is None:
                    self.on_stop(tracked.request_id, delta.index, stop)
                reason, choice.stop_string = "stop", stop
        text = choice.detok.release(final=reason is not None)
        choice.text += text
        choice.finish_reason = reason
        if delta.logprobs is not None and choice.logprobs is not None:
            choice.logprobs += delta.logprobs
        event = delta_event(Delta(delta.request_id, delta.index, text, delta.token_ids,
                                  delta.logprobs, reason), self.tokenizer, tracked.top_n)
        if delta.prompt_logprobs is not None and tracked.prompt_logprobs is None:
            tracked.prompt_logprobs = prompt_entries(self.tokenizer, tracked.prompt_ids,
                                                     delta.prompt_logprobs, tracked.prompt_top_n)
        if not choice.started:
            choice.started = True
            event.update(self._prompt_fields(tracked))
        return event

    def _prompt_fields(self, tracked: _Tracked) -> dict:
        """The echo's prompt text and the prompt's logprobs, for the events that carry them."""
        fields = {}
        if tracked.echo:
            fields["prompt_text"] = tracked.prompt if tracked.prompt is not None else \
                self.tokenizer.decode(tracked.prompt_ids, skip_special_tokens=True)
        if tracked.prompt_logprobs is not None:
            fields["prompt_logprobs"] = tracked.prompt_logprobs
        return fields

    def _finish(self, output: RequestOutput) -> None:
        tracked = self._tracked.pop(output.request_id, None)
        if tracked is None:
            return
        failed = [o for o in output.outputs if o.error]
        if failed:  # the engine could not finish it: this request alone, or it gave up
            kind = ServiceError if failed[0].error_is_internal else EngineUnavailable
            self._send(tracked, events.error_event(kind(failed[0].error)))
            return
        try:
            event = final_event(self._final_output(tracked, output), self.tokenizer,
                                tracked.top_n)
            if output.prompt_logprobs is not None and tracked.prompt_logprobs is None:
                tracked.prompt_logprobs = prompt_entries(
                    self.tokenizer, tracked.prompt_ids, output.prompt_logprobs,
                    tracked.prompt_top_n)
            event.update(self._prompt_fields(tracked))
        except Exception as exc:
            self._fail(tracked, exc)
            return
        self._send(tracked, event)

    @staticmethod
    def _final_output(tracked: _Tracked, output: RequestOutput) -> RequestOutput:
        """The engine's final output with each choice as its caller saw it (text, tokens up to
        a stop string found here, logprobs kept here)."""
        outputs = []
        for choice, engine_out in zip(tracked.choices, output.outputs):
            stop_reason = choice.stop_string if choice.stop_string is not None \
                else engine_out.stop_reason
            outputs.append(CompletionOutput(
                engine_out.index, choice.text, choice.token_ids,
                choice.finish_reason or engine_out.finish_reason, stop_reason, choice.logprobs))
        return RequestOutput(output.request_id, output.prompt, output.prompt_token_ids, outputs,
                             True, output.num_cached_tokens)

    def _fail(self, tracked: _Tracked, exc: Exception) -> None:
        log.exception("request %s: its output could not be made", tracked.request_id)
        self._tracked.pop(tracked.request_id, None)
        self._send(tracked, events.error_event(ServiceError(
            f"the engine could not render this request's output: {type(exc).__name__}: {exc}")))
        self.on_error(tracked.request_id)

    @staticmethod
    def _send(tracked: _Tracked, event: dict) -> None:
        loop, q = tracked.target
        loop.call_soon_threadsafe(q.put_nowait, event)
