"""Which engine replica takes a request (``deployment.replicas`` > 1, ``deployment.routing``).

``prefix``: a request goes to the engine that most likely holds the longest leading part of
its prompt in its KV cache. The router remembers, per engine, the chained hashes of the
prompt chunks it sent there (16 token ids, or 64 characters of text or of a chat's
messages; at most ``MEMORY`` chunks per engine, the oldest forgotten first) and picks the
engine matching the most leading chunks; a prompt that matches nowhere goes where its first
chunk hashes to (rendezvous hashing: every front door agrees, and adding an engine moves
only its share). The engine so chosen is passed over when it is much busier than the least
busy one (more than ``2 x least + SLACK`` requests open through this router), so one hot
prefix cannot pile everything onto one engine. ``random``: uniformly at random (the baseline
prefix routing is measured against).

Each front door (a Serve replica of the HTTP API) has its own router, counting the requests
it has open on each engine.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

CHUNK_TOKENS = 16
CHUNK_CHARS = 64
MEMORY = 65536  # chunk hashes remembered per engine
SLACK = 4


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
    def __init__(self, replicas: int, policy: str = "prefix", seed: int | None = None):
        self.replicas, self.policy = replicas, policy
        self.open = [0] * replicas  # requests open on each engine through this router
        self._seen = [OrderedDict() for _ in range(replicas)]  # chunk hash -> None, by age
        self._rng = random.Random(seed)

    def pick(self, key: list[bytes]) -> int:
        if self.replicas == 1:
            return 0
        if self.policy == "random":
            return self._rng.randrange(self.replicas)
        choice = self._home(key)
        least = min(range(self.replicas), key=self.open.__getitem__)
        if self.open[choice] > 2 * self.open[least] + SLACK:  # much busier: the least busy
            choice = least
        self._remember(choice, key)
        return choice

    def _home(self, key: list[bytes]) -> int:
        """The engine that was sent the most leading chunks of this prompt; else where the
        first chunk hashes to; a prompt shorter than a chunk: the least busy engine."""
        matched = [self._matched(r, key) for r in range(self.replicas)]
        if max(matched) > 0:
            return max(range(self.replicas), key=matched.__getitem__)
        if not key:
            return min(range(self.replicas), key=self.open.__getitem__)
        return max(range(self.replicas), key=lambda r: hashlib.blake2b(
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
