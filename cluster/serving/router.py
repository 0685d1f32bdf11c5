"""Which engine replica takes a request (``deployment.replicas`` > 1, ``deployment.routing``).

By health first: while some engine is ``ready``, a request goes only to a ready one; one that
is starting, recovering or failed is passed over. When none is ready, the request goes to
the engines that would take it soonest, in this order (:data:`PREFERENCE`): recovering
(requests wait in the engine and run once its gang is back), starting, failed (the one whose
next try comes first, by its ``retry_in_s``), gone. The policy below chooses among those.
The router does not ask the engines itself: its front door tells it each engine's health
(:meth:`Router.observe`) whenever it asks them, which it does when what it was told is older
than ``health_ttl_s`` or no engine was ready (:meth:`Router.ready_known`), or after an engine
refused a request (:meth:`Router.doubt`); an engine not heard of yet counts as ready.

``prefix``: a request goes to the engine that most likely holds the longest leading part of
its prompt in its KV cache. The router remembers, per engine, the chained hashes of the
prompt chunks it sent there (16 token ids, or 64 characters of text or of a chat's
messages; at most ``MEMORY`` chunks per engine, the oldest forgotten first) and picks the
engine matching the most leading chunks; a prompt that matches nowhere goes where its first
chunk hashes to (rendezvous hashing: every front door agrees, and adding an engine moves
only its share; with an engine passed over, its share goes to each prompt's next choice).
The engine so chosen is passed over when it is much busier than the least busy one (more
than ``2 x least + SLACK`` requests open through this router), so one hot prefix cannot pile
everything onto one engine. ``random``: uniformly at random (the baseline prefix routing is
measured against).

Each front door (a Serve replica of the HTTP API) has its own router, counting the requests
it has open on each engine and keeping what it was last told of each engine's health.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import OrderedDict

CHUNK_TOKENS = 16
CHUNK_CHARS = 64
MEMORY = 65536  # chunk hashes remembered per engine
SLACK = 4
HEALTH_TTL_S = 2.0  # how long a front door trusts what it was told of the engines' health
# engine states, the most willing to take a request first (EngineService.health, and
# "unavailable": the actor is gone); a state not named here comes after them
PREFERENCE = ("ready", "recovering", "starting", "failed", "unavailable")


def preference(status: str | None) -> int:
    """How willing an engine in this state is to take a request: smaller is sooner. Not
    known yet (None) counts as ready."""
    if status is None:
        return 0
    return PREFERENCE.index(status) if status in PREFERENCE else len(PREFERENCE)


def routing_key(prompt=None, messages=None, prompt_token_ids=None) -> list[bytes]:
    """The chained hashes of a prompt's full leading chunks (hash i covers chunks 0..i)."""
    if prompt_token_ids:
        units = [",".join(map(str, prompt_token_ids[i:i + CHUNK_TOKENS])).encode()
                 for i in range(0, len(prompt_token_ids) - CHUNK_TOKENS + 1, CHUNK_TOKENS)]
    else:
        text = prompt or "".join(f"{m.get('role')}:{m.get('content')}\n" for m in messages or [])
        data = text.encode("utf-8", "replace")
        units = [data[i:i + CHUNK_CHARS] for i in range(0, len(data) - CHUNK_CHARS + 1, CHUNK_CHARS)]
    chain, previous = [], b""
    for unit in units:
        previous = hashlib.blake2b(previous + unit, digest_size=16).digest()
        chain.append(previous)
    return chain


class Router:
    def __init__(self, replicas: int, policy: str = "prefix", seed: int | None = None,
                 health_ttl_s: float = HEALTH_TTL_S):
        self.replicas, self.policy = replicas, policy
        self.open = [0] * replicas  # requests open on each engine through this router
        self._seen = [OrderedDict() for _ in range(replicas)]  # chunk hash -> None, by age
        self._rng = random.Random(seed)
        self.health_ttl_s = health_ttl_s
        # what the front door was last told of each engine: status (None: nothing yet), when
        # a failed one tries again (monotonic), when it was told (monotonic)
        self.status: list[str | None] = [None] * replicas
        self._retry_at = [math.inf] * replicas
        self._told_at = [-math.inf] * replicas

    def pick(self, key: list[bytes]) -> int:
        if self.replicas == 1:
            return 0
        among = self._eligible()
        if self.policy == "random":
            return self._rng.choice(among)
        choice = self._home(key, among)
        least = min(among, key=self.open.__getitem__)
        if self.open[choice] > 2 * self.open[least] + SLACK:  # much busier: the least busy
            choice = least
        self._remember(choice, key)
        return choice

    def _eligible(self) -> list[int]:
        """The engines a request may go to: those in the most willing state (the ready ones
        while any is); of failed ones, those whose next try comes first."""
        rank = [preference(s) for s in self.status]
        among = [r for r in range(self.replicas) if rank[r] == min(rank)]
        if self.status[among[0]] == "failed":
            soonest = min(self._retry_at[r] for r in among)
            among = [r for r in among if self._retry_at[r] == soonest]
        return among

    def _home(self, key: list[bytes], among: list[int]) -> int:
        """Of ``among``: the engine that was sent the most leading chunks of this prompt;
        else where the first chunk hashes to; a prompt shorter than a chunk: the least busy
        engine."""
        matched = {r: self._matched(r, key) for r in among}
        if max(matched.values()) > 0:
            return max(among, key=matched.__getitem__)
        if not key:
            return min(among, key=self.open.__getitem__)
        return max(among, key=lambda r: hashlib.blake2b(
            key[0] + r.to_bytes(2, "little"), digest_size=8).digest())

    def _matched(self, replica: int, key: list[bytes]) -> int:
        seen, count = self._seen[replica], 0
        for chunk in key:
            if chunk not in seen:
                break
            count += 1
        return count

    def _remember(self, replica: int, key: list[bytes]) -> None:
        seen = self._seen[replica]
        for chunk in key:
            seen[chunk] = None
            seen.move_to_end(chunk)
        while len(seen) > MEMORY:
            seen.popitem(last=False)

    def opened(self, replica: int) -> None:
        self.open[replica] += 1

    def closed(self, replica: int) -> None:
        self.open[replica] -= 1

    # ---- the engines' health, as the front door learns it ----------------------------------
    def observe(self, replica: int, status: str, retry_in_s: float | None = None,
                now: float | None = None) -> None:
        """What the engine ``replica`` said of its health (``retry_in_s``: a failed engine's
        next try), ``now`` (monotonic; default: the clock)."""
        now = time.monotonic() if now is None else now
        self.status[replica] = status
        self._retry_at[replica] = math.inf if retry_in_s is None else now + retry_in_s
        self._told_at[replica] = now

    def doubt(self) -> None:
        """An engine refused a request: what the router was told is no longer trusted (it
        still routes by it until told again)."""
        self._told_at = [-math.inf] * self.replicas

    def ready_known(self, now: float | None = None) -> bool:
        """Whether some engine was ready when every engine's health was last told, within
        ``health_ttl_s`` and with no refusal since: else the front door asks them again."""
        now = time.monotonic() if now is None else now
        return (now - min(self._told_at) < self.health_ttl_s
                and "ready" in self.status)
