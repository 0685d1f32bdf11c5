"""The Responses API's stored responses (``store: true``): what ``GET /v1/responses/{id}``
answers and what ``previous_response_id`` continues.

One named, detached Ray actor per deployment (``<deployment.name>-responses``), shared by
every API replica, so a chain can move between replicas. It keeps records (bytes) in
least-recently-used order, bounded by count (``deployment.response_store_items``) and by
bytes (``deployment.response_store_bytes``): a new record drops the least recently used
ones until both bounds hold; reading a record (a GET, a continuation) makes it the most
recent. A record larger than the byte bound is not kept at all.

The records live in the actor's memory only. When its process dies Ray restarts it, empty:
the ids it held are then unknown (404, or ``previous_response_not_found``), and a call made
while it is down fails at once or within :data:`CALL_TIMEOUT_S`: the API answers 503 then,
it never waits without end (:func:`call`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import ray

# what a record costs beyond its bytes and its id's (the dict slot, the bytes object)
RECORD_OVERHEAD = 64
CALL_TIMEOUT_S = 10.0
log = logging.getLogger("shardlm.serve")


class StoreUnavailable(Exception):
    """The store did not answer (its actor lost or restarting)."""


class ResponseStore:
    """Body of the store actor: records by response id, least recently used first out."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.records: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self.evicted = 0  # records dropped to make room

    @staticmethod
    def _size(response_id: str, record: bytes) -> int:
        return len(record) + len(response_id.encode()) + RECORD_OVERHEAD

    def put(self, response_id: str, record: bytes) -> bool:
        """Keep ``record`` as the most recent; False (nothing kept) if it alone is over the
        byte bound."""
        size = self._size(response_id, record)
        if size > self.max_bytes:
            return False
        self.delete(response_id)
        while self.records and (len(self.records) >= self.max_items
                                or self.bytes + size > self.max_bytes):
            old_id, old = self.records.popitem(last=False)
            self.bytes -= self._size(old_id, old)
            self.evicted += 1
        self.records[response_id] = record
        self.bytes += size
        return True

    def get(self, response_id: str) -> bytes | None:
        record = self.records.get(response_id)
        if record is not None:
            self.records.move_to_end(response_id)
        return record

    def delete(self, response_id: str) -> bool:
        record = self.records.pop(response_id, None)
        if record is None:
            return False
        self.bytes -= self._size(response_id, record)
        return True

    def stats(self) -> dict:
        return {"items": len(self.records), "bytes": self.bytes, "max_items": self.max_items,
                "max_bytes": self.max_bytes, "evicted": self.evicted}


def store_name(deployment: str) -> str:
    return f"{deployment}-responses"


def get_or_start_store(config):
    """The store actor of ``config``'s deployment (an EngineConfig), created if absent: on a
    node with ``deployment.resources`` as the engine services are, restarted by Ray (empty)
    whenever its process dies."""
    dep = config.deployment
    actor = ray.remote(ResponseStore).options(
        name=store_name(dep.name), namespace=dep.namespace, lifetime="detached",
        get_if_exists=True, num_cpus=0, resources=dict(dep.resources), max_restarts=-1,
        max_task_retries=0)
    return actor.remote(dep.response_store_items, dep.response_store_bytes)


def stop_store(name: str, namespace: str) -> bool:
    try:
        actor = ray.get_actor(store_name(name), namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


async def call(method, *args):
    """``method.remote(*args)``'s result, or StoreUnavailable when the actor is lost or does
    not answer within :data:`CALL_TIMEOUT_S`."""
    try:
        return await asyncio.wait_for(method.remote(*args), CALL_TIMEOUT_S)
    except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
        log.warning("the response store did not answer: %s: %s", type(exc).__name__, exc)
        raise StoreUnavailable(str(exc)) from exc
