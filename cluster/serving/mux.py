"""An API replica's streams: one subscription per engine service for all its requests, and a
bounded backlog per request.

:class:`MuxedRequestStream` is a :class:`cluster.serving.stream.RequestStream` (the same
journal, resumption and cancellation) whose events arrive through the process's :class:`Mux`:
one subscription (``EngineService.subscribe``) per engine service, read as fast as it comes,
whatever any reader does. Each request's events wait for its reader in a :class:`Backlog` of
its own, bounded in bytes (``deployment.stream_buffer_bytes``): a reader that falls further
behind has its stream dropped (:class:`StreamDropped`, its waiting events freed, its request
aborted on the engine, a warning in the log naming it), and no other stream notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque

import msgpack

from cluster.contract.errors import ServiceError
from cluster.serving.stream import RequestStream

BUFFER_BYTES = 1 << 20  # deployment.stream_buffer_bytes' default
# what a waiting event costs beyond its encoded bytes (the bytes object and its queue slot),
# counted against the bound so that many tiny events are not undercounted
EVENT_OVERHEAD = 96
log = logging.getLogger("shardlm.stream")


class StreamDropped(ServiceError):
    """The stream's reader fell too far behind: the stream was dropped and its request
    aborted on the engine."""


class Backlog:
    """One request's events (encoded) waiting for its reader in the API replica, then the
    exception that ends them, if one does. ``limit``: the bytes that may wait, each event
    counted with :data:`EVENT_OVERHEAD`; :meth:`over` once more wait than that, or than twice
    the request's largest batch (what one item of the subscription brought it) where that is
    more: a reader that keeps up is at most a batch or two behind, however large its events
    (64 choices with 20 logprobs, an echoed prompt's logprobs)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: deque = deque()
        self.bytes = 0
        self.burst = 0  # the most bytes one batch brought
        self._waiter: asyncio.Future | None = None

    def put(self, data: bytes) -> int:
        """Queue an event; the bytes it counts for."""
        size = len(data) + EVENT_OVERHEAD
        self.items.append(data)
        self.bytes += size
        self._wake()
        return size

    def end(self, error: BaseException, drop: bool = False) -> None:
        """``error`` is raised to the reader after the events waiting (``drop``: instead of
        them, which are freed now)."""
        if drop:
            self.items.clear()
            self.bytes = 0
        self.items.append(error)
        self._wake()

    def over(self) -> bool:
        return self.bytes > max(self.limit, 2 * self.burst)

    async def get(self):
        """The next event's bytes, or the exception that ended the stream."""
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self.items.popleft()
        if isinstance(item, bytes):
            self.bytes -= len(item) + EVENT_OVERHEAD
        return item

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Mux:
    """One subscription (``EngineService.subscribe``) carrying the events of every request
    this process sends an engine service through :class:`MuxedRequestStream`: a step's
    tokens for all of them arrive as one Ray item instead of one item per request and token.
    The subscription is read as fast as it comes, whatever any reader does; each request's
    events wait for its reader in its own :class:`Backlog`, and a request whose backlog goes
    over its bound is dropped (:class:`StreamDropped` to its reader, its events freed, the
    request aborted on the engine): a reader that does not read costs the others nothing and
    this process at most its bound. When the subscription breaks (the engine actor lost),
    every open request gets the error, resumes as a :class:`RequestStream` does, and the next
    request opens a new subscription."""

    _of: dict = {}  # engine service actor id -> its Mux in this process

    def __init__(self, service):
        self.service = service
        self.queues: dict[str, Backlog] = {}
        self.subscriber: str | None = None
        self.stream = None  # the subscription's Ray stream
        self.items = 0  # batches received (each holds the events ready at once)
        self.dropped = 0  # requests dropped for a reader too far behind
        self._task: asyncio.Task | None = None

    @classmethod
    def of(cls, service) -> "Mux":
        key = service._actor_id.hex()
        if key not in cls._of:
            cls._of[key] = cls(service)
        return cls._of[key]

    def open(self, request_id: str, limit: int = BUFFER_BYTES) -> Backlog:
        """The backlog of ``request_id``'s events (``limit``: its bound in bytes), or of the
        exception that ended them; subscribes if nothing does yet."""
        if self._task is None or self._task.done():
            self.subscriber = f"{os.getpid()}-{uuid.uuid4().hex}"
            self._task = asyncio.ensure_future(self._read(self.subscriber))
        self.queues[request_id] = backlog = Backlog(limit)
        return backlog

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def _read(self, subscriber: str) -> None:
        self.stream = stream = self.service.subscribe.options(num_returns="streaming").remote(subscriber)
        try:
            async for ref in stream:
                self.items += 1
                self._deliver(msgpack.unpackb(await ref))
            error: BaseException = ServiceError("the engine service ended the subscription")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine actor lost, or the stream broken
            error = exc
        if self.subscriber == subscriber:  # every request still open learns it
            for backlog in self.queues.values():
                backlog.end(error)
            self.queues.clear()

    def _deliver(self, batch: list) -> None:
        """A batch's events into their requests' backlogs; a request left further behind than
        its bound is dropped."""
        added: dict[str, int] = {}
        for request_id, data, _ in batch:
            backlog = self.queues.get(request_id)
            if backlog is not None:
                added[request_id] = added.get(request_id, 0) + backlog.put(data)
        for request_id, size in added.items():
            backlog = self.queues[request_id]
            backlog.burst = max(backlog.burst, size)
            if backlog.over():
                self._drop(request_id, backlog)

    def _drop(self, request_id: str, backlog: Backlog) -> None:
        behind = backlog.bytes
        self.queues.pop(request_id, None)
        self.dropped += 1
        backlog.end(StreamDropped(f"the stream was dropped: its reader fell {behind} bytes "
                                  f"behind (deployment.stream_buffer_bytes={backlog.limit})"),
                    drop=True)
        self.service.abort.remote(request_id)
        log.warning("request %s: its reader fell %d bytes behind (deployment.stream_buffer_bytes"
                    "=%d): its stream is dropped and the request aborted", request_id, behind,
                    backlog.limit)


class MuxedRequestStream(RequestStream):
    """A :class:`RequestStream` read with asyncio whose events arrive through the process's
    :class:`Mux` (the API replica's way in); the same journal, resumption and cancellation.
    ``buffer_bytes``: the bound of its backlog (see :class:`Backlog`); a reader further
    behind gets :class:`StreamDropped`."""

    def __init__(self, service, *args, buffer_bytes: int = BUFFER_BYTES, **kwargs):
        self.buffer_bytes = buffer_bytes
        super().__init__(service, *args, **kwargs)

    @property
    def buffered_bytes(self) -> int:
        """The bytes of its events waiting to be read."""
        return self._queue.bytes

    def _submit(self):
        mux = Mux.of(self.service)
        self._queue = mux.open(self.request_id, self.buffer_bytes)
        # submit() answers with the incarnation that took the request
        self._sent_to = self.service.submit.remote(self._body(), mux.subscriber)
        return mux

    def __next__(self) -> dict:
        raise TypeError("a MuxedRequestStream is read with async for")

    async def __anext__(self) -> dict:
        while not self.done:
            with self._errors():
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                event = self._accept(item)
                if self.done:
                    self._events.close(self.request_id)
                return event
            await self._await_engine()
            self._resend()
        raise StopAsyncIteration

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._events.close(self.request_id)
            self.service.abort.remote(self.request_id)
