"""One request to the engine service, read the same way by every front door.

Client handles (:mod:`cluster.serving.client`) and the HTTP API
(:mod:`cluster.serving.http.app`) both send a request through :class:`RequestStream` and
read its events (:mod:`cluster.contract.events`) from it, synchronously or with asyncio:

- errors arrive as typed exceptions (:mod:`cluster.contract.errors`): an ``error`` event
  becomes its RequestError / EngineUnavailable / ServiceError, a dead engine actor
  EngineUnavailable, a broken stream ServiceError;
- one cancellation rule: :meth:`RequestStream.cancel` (also on leaving a ``with`` block or
  dropping the stream early) cancels the Ray stream and aborts the request on the engine,
  which frees its KV blocks. Cancelling a finished request does nothing;
- the request's journal: what was asked and, per choice, every token already handed to the
  caller. When the engine actor is lost (its process or node dies; Ray restarts it), the
  stream waits for the new engine to be ready and sends the request again with the journal
  (``resume``): the engine takes the sent tokens as already generated and goes on, so the
  caller receives no token twice and none missing, and greedy or seeded output equals a run
  without the failure. It gives up (EngineUnavailable) after ``resume_timeout_s``.
  A read that fails with the engine still alive (a transient Ray error: the actor answers
  health() as the same incarnation the request was sent to) takes the request back there
  instead: sent again with the journal and that incarnation, it replaces the engine's copy,
  whose events since the break were lost with the broken stream.

What a stream has handed on is kept only as far as a resume or the final event needs it:
token ids, and logprobs only where the final event carries them. (The API replica reads its
streams through :mod:`cluster.serving.mux`.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from array import array
from contextlib import contextmanager

import ray

from cluster.contract import events
from cluster.contract.errors import EngineUnavailable, ServiceError

_UNAVAILABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RESUME_TIMEOUT_S = 600.0  # how long a stream waits for a lost engine's replacement
_POLL_S = 0.5
log = logging.getLogger("shardlm.stream")


class RequestStream:
    """The event stream of one request; iterate it (``for`` or ``async for``) for its events,
    the last being the ``final`` one."""

    def __init__(self, service, prompt=None, messages=None, prompt_token_ids=None,
                 params: dict | None = None, request_id: str | None = None, priority: int = 0,
                 resume_timeout_s: float = RESUME_TIMEOUT_S, final_logprobs: bool = True,
                 echo: bool = False, tools: list | None = None):
        self.service = service
        self.request_id = request_id or f"req-{uuid.uuid4().hex}"
        self._fields = dict(request_id=self.request_id, prompt=prompt, messages=messages,
                            prompt_token_ids=prompt_token_ids, params=params or {},
                            priority=priority, final_logprobs=final_logprobs, echo=echo,
                            tools=tools)
        events.encode_request(**self._fields)  # bad text fails here, before anything is sent
        self.resume_timeout_s = resume_timeout_s
        self.journal: dict[int, dict] = {}  # choice -> token_ids, logprobs, finish_reason sent
        self.resumes = 0  # how many times the request moved to a new engine
        self.retakes = 0  # how many times it was taken back from the same engine
        # the engine incarnation (EngineService.incarnation) it was last sent to: an ObjectRef
        # until the stream breaks (resolving it costs the happy path nothing), then its value
        self._sent_to = None
        self._resent = False  # sent more than once: always with ``resume`` (maybe empty)
        self._lost_at: float | None = None  # when the engine was found lost
        # the last resume's moments (time.monotonic): the loss seen, the new engine ready, the
        # first event from it
        self.last_resume: dict[str, float] = {}
        self.on_close = None  # called once when the stream ends or is cancelled (a router's count)
        self._done = False
        self._events = self._submit()

    @property
    def done(self) -> bool:
        return self._done

    @done.setter
    def done(self, value: bool) -> None:
        if value and not self._done and self.on_close is not None:
            self.on_close()
        self._done = value

    def _submit(self):
        events_ = self.service.generate.options(num_returns="streaming").remote(self._body())
        # which incarnation took it, read only if the stream breaks; asked after the request,
        # so that a restart in between names the new engine, which does not hold the request
        # (it takes the resume as any new engine does)
        self._sent_to = self.service.health.remote()
        return events_

    def _body(self) -> bytes:
        """The request as the engine service takes it, with what the journal holds."""
        resume = incarnation = None
        if self.journal or self._resent:  # even with nothing sent: it may replace a live copy
            n = int(self._fields["params"].get("n") or 1)
            resume = [{"token_ids": list(self.journal.get(i, {}).get("token_ids", [])),
                       "finish_reason": self.journal.get(i, {}).get("finish_reason")}
                      for i in range(n)]
            incarnation = self._sent_to if isinstance(self._sent_to, str) else None
        return events.encode_request(**self._fields, resume=resume, incarnation=incarnation)

    # ---- reading ---------------------------------------------------------------------------
    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> dict:
        while not self.done:
            with self._errors():  # a lost engine is swallowed here when the request can move
                try:
                    data = ray.get(next(self._events))
                except StopIteration:
                    raise ServiceError("the engine ended the request without a result") from None
                return self._accept(data)
            self._wait_for_engine()
            self._resend()
        raise StopIteration

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> dict:
        while not self.done:
            with self._errors():
                try:
                    data = await (await self._events.__anext__())
                except StopAsyncIteration:
                    raise ServiceError("the engine ended the request without a result") from None
                return self._accept(data)
            await self._await_engine()
            self._resend()
        raise StopAsyncIteration

    def final(self) -> dict:
        """Read to the end (keeping no deltas); the ``final`` event."""
        event = None
        for event in self:
            pass
        return _final(event)

    async def afinal(self) -> dict:
        event = None
        async for event in self:
            pass
        return _final(event)

    def _accept(self, data: bytes) -> dict:
        event = events.decode(data)
        self.done = event["type"] != "delta"
        if self._lost_at is not None:
            self.last_resume["first_event"] = time.monotonic()
        self._lost_at = None
        if event["type"] == "delta":
            self._record(event)
        elif event["type"] == "final" and (self.resumes or self.retakes):
            self._restore_logprobs(event)
        return events.raise_if_error(event)

    def _record(self, delta: dict) -> None:
        entry = self.journal.setdefault(delta["index"], {
            "token_ids": array("i"), "logprobs": [], "finish_reason": None})  # 4 bytes a token
        entry["token_ids"].extend(delta["token_ids"])
        # the rendered logprobs are kept only for a final event that carries them (a resumed
        # engine knows only its own); a caller that reads them from the deltas asked for
        # none there (final_logprobs false), and they would grow with the output for nothing
        if self._fields["final_logprobs"]:
            entry["logprobs"] += delta.get("logprobs") or []
        entry["finish_reason"] = delta.get("finish_reason") or entry["finish_reason"]

    def _restore_logprobs(self, final: dict) -> None:
        """A resumed engine knows only the logprobs of the tokens it made: the ones sent
        before come from the journal."""
        for output in final["outputs"]:
            sent = self.journal.get(output["index"], {}).get("logprobs")
            if output.get("logprobs") is not None and sent:
                output["logprobs"][:len(sent)] = sent

    # ---- an engine lost and replaced ----------------------------------------------------------
    def _resend(self) -> None:
        self._resent = True
        self._events = self._submit()

    def _may_resume(self) -> bool:
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        return now - self._lost_at < self.resume_timeout_s

    def _engine_state(self, state: dict | None) -> bool:
        """Whether the request can be sent again: the same engine answers (the break was
        Ray's, not the engine's: take the request back there), or a replacement is ready;
        raises when it will not be."""
        if state is not None and isinstance(self._sent_to, str) \
                and state.get("incarnation") == self._sent_to:
            self.retakes += 1
            log.warning("request %s: its stream broke with the engine alive; taking it back "
                        "(retake %d)", self.request_id, self.retakes)
            return True
        # failed for good; one that says when it tries again (retry_in_s: a replacement whose
        # start failed, e.g. its checkpoint or capacity not back yet) is waited for
        if state is not None and state.get("status") == "failed" \
                and state.get("retry_in_s") is None:
            self.done = True
            raise EngineUnavailable(f"the engine did not come back: {state.get('reason')}")
        if state is not None and state.get("status") == "ready":
            self.resumes += 1
            self.last_resume = {"lost": self._lost_at, "ready": time.monotonic()}
            log.warning("request %s resumes on a new engine after %.1f s (resume %d)",
                        self.request_id, time.monotonic() - self._lost_at, self.resumes)
            return True
        if time.monotonic() - self._lost_at > self.resume_timeout_s:
            self.done = True
            raise EngineUnavailable(f"the engine was lost and not back within "
                                    f"{self.resume_timeout_s:.0f} s")
        return False

    def _wait_for_engine(self) -> None:
        try:
            self._sent_to = _incarnation(ray.get(self._sent_to, timeout=_POLL_S * 4))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError, TypeError, ValueError):
            self._sent_to = None  # unknown: only a new engine's readiness lets it go on
        while True:
            try:
                state = ray.get(self.service.health.remote(), timeout=_POLL_S * 4)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                state = None
            if self._engine_state(state):
                return
            time.sleep(_POLL_S)

    async def _await_engine(self) -> None:
        try:
            self._sent_to = _incarnation(await asyncio.wait_for(self._sent_to, _POLL_S * 4))
        except (ray.exceptions.RayError, asyncio.TimeoutError, TypeError, ValueError):
            self._sent_to = None  # unknown: only a new engine's readiness lets it go on
        while True:
            try:
                state = await asyncio.wait_for(self.service.health.remote(), _POLL_S * 4)
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                state = None
            if self._engine_state(state):
                return
            await asyncio.sleep(_POLL_S)

    @contextmanager
    def _errors(self):
        """Ray's errors while reading, as the contract's typed errors; a read that failed so
        ends the stream (a cancelled read does not: the caller still has to cancel)."""
        try:
            yield
        except ServiceError:
            self.done = True
            raise
        except _UNAVAILABLE as exc:
            if self._may_resume():  # swallowed: the reader waits for the new engine
                log.warning("request %s: the engine was lost (%s); waiting for its replacement",
                            self.request_id, type(exc).__name__)
                return
            self.done = True
            raise EngineUnavailable("the engine service is unavailable") from exc
        except ray.exceptions.RayError as exc:
            self.done = True
            raise ServiceError(f"the engine failed: {exc}") from exc

    # ---- cancelling ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Abort the request if it is still running (frees its KV blocks)."""
        if not self.done:
            self.done = True
            ray.cancel(self._events)
            self.service.abort.remote(self.request_id)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


def _incarnation(answer) -> str | None:
    """The incarnation in a health() answer (a dict) or a submit() answer (the id itself)."""
    return answer.get("incarnation") if isinstance(answer, dict) else answer


def _final(last: dict | None) -> dict:
    if last is None or last["type"] != "final":
        raise ServiceError("the engine closed the stream without a final result")
    return last
