"""One request to the engine service, read the same way by every front door.

Client handles (:mod:`cluster.serving.client`) and the HTTP API
(:mod:`cluster.serving.http.app`) both send a request through :class:`RequestStream` and
read its events (:mod:`cluster.contract.events`) from it, synchronously or with asyncio:

- errors arrive as typed exceptions (:mod:`cluster.contract.errors`): an ``error`` event
  becomes its RequestError / EngineUnavailable / ServiceError, a dead engine actor
  EngineUnavailable, a broken stream ServiceError;
- one cancellation rule: :meth:`RequestStream.cancel` (also on leaving a ``with`` block or
  dropping the stream early) cancels the Ray stream and aborts the request on the engine,
  which frees its KV blocks. Cancelling a finished request does nothing.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import ray

from cluster.contract import events
from cluster.contract.errors import EngineUnavailable, ServiceError

_UNAVAILABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RequestStream:
    """The event stream of one request; iterate it (``for`` or ``async for``) for its events,
    the last being the ``final`` one."""

    def __init__(self, service, prompt=None, messages=None, prompt_token_ids=None,
                 params: dict | None = None, request_id: str | None = None, priority: int = 0):
        self.service = service
        self.request_id = request_id or f"req-{uuid.uuid4().hex}"
        body = events.encode_request(request_id=self.request_id, prompt=prompt, messages=messages,
                                     prompt_token_ids=prompt_token_ids, params=params or {},
                                     priority=priority)
        self._events = service.generate.options(num_returns="streaming").remote(body)
        self.done = False

    # ---- reading ---------------------------------------------------------------------------
    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> dict:
        if self.done:
            raise StopIteration
        with self._errors():
            try:
                data = ray.get(next(self._events))
            except StopIteration:
                raise ServiceError("the engine ended the request without a result") from None
        return self._accept(data)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> dict:
        if self.done:
            raise StopAsyncIteration
        with self._errors():
            try:
                data = await (await self._events.__anext__())
            except StopAsyncIteration:
                raise ServiceError("the engine ended the request without a result") from None
        return self._accept(data)

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
        return events.raise_if_error(event)

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
            self.done = True
            raise EngineUnavailable(f"the engine service is unavailable: {exc}") from exc
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


def _final(last: dict | None) -> dict:
    if last is None or last["type"] != "final":
        raise ServiceError("the engine closed the stream without a final result")
    return last
