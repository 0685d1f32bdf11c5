"""Suffix decoding's cache: the outputs of a deployment's recent requests, for guessing what a
new output will say from what earlier outputs said after the same words.

Every place of every cached output starts a path of up to ``max_depth`` tokens in one trie
whose nodes count how many cached places reached them. To guess after a context, its longest
suffix (up to ``max_depth - 1`` tokens) that the trie holds is found, and from there the
most frequent next token is taken while the chance of the whole run (each token's count over
its parent's) stays at least ``min_token_prob``.

Bounded: at most ``max_requests`` outputs and ``max_tokens`` tokens are cached (so at most
``max_tokens * max_depth`` nodes); past either bound the oldest outputs are evicted first,
their paths' counts taken back and empty nodes removed. An output longer than ``max_tokens``
is cached by its last ``max_tokens`` tokens.
"""

from __future__ import annotations

from collections import deque


class _Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, _Node] | None = None


class SuffixCache:
    def __init__(self, max_depth: int = 16, max_requests: int = 1000, max_tokens: int = 32768,
                 min_token_prob: float = 0.1):
        self.max_depth, self.max_requests, self.max_tokens = max_depth, max_requests, max_tokens
        self.min_token_prob = min_token_prob
        self.root = _Node()
        self._cached: deque[list[int]] = deque()  # oldest first
        self.num_tokens = 0  # tokens of the cached outputs

    def __len__(self) -> int:
        return len(self._cached)

    def add(self, output: list[int]) -> None:
        """Cache a finished request's output (evicting the oldest past the bounds)."""
        tokens = [int(t) for t in output[-self.max_tokens:]]
        if not tokens:
            return
        self._cached.append(tokens)
        self.num_tokens += len(tokens)
        self._walk(tokens, +1)
        while len(self._cached) > self.max_requests or self.num_tokens > self.max_tokens:
            old = self._cached.popleft()
            self.num_tokens -= len(old)
            self._walk(old, -1)

    def _walk(self, tokens: list[int], change: int) -> None:
        """Add (+1) or take back (-1) every place's path of up to ``max_depth`` tokens."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start:start + self.max_depth]:
                children = node.children
                if children is None:
                    children = node.children = {}
                child = children.get(token)
                if child is None:
                    child = children[token] = _Node()
                child.count += change
                if child.count <= 0:  # the last place that reached it is gone
                    del children[token]
                    if not children:
                        node.children = None
                    break
                node = child

    def propose(self, context: list[int], limit: int) -> tuple[int, list[int]]:
        """(length of the context's suffix matched, up to ``limit`` guesses); (0, []) where
        no suffix of the context is cached."""
        if limit <= 0 or self.root.children is None:
            return 0, []
        for length in range(min(self.max_depth - 1, len(context)), 0, -1):
            node = self._find(context[len(context) - length:])
            if node is None or node.children is None:
                continue
            guesses, chance = [], 1.0
            while node.children and len(guesses) < limit:
                # the most frequent next token (the lowest id among equals)
                token, child = max(node.children.items(), key=lambda kv: (kv[1].count, -kv[0]))
                chance *= child.count / node.count
                if chance < self.min_token_prob:
                    break
                guesses.append(token)
                node = child
            if guesses:
                return length, guesses
        return 0, []

    def _find(self, path: list[int]) -> _Node | None:
        node = self.root
        for token in path:
            if node.children is None:
                return None
            node = node.children.get(token)
            if node is None:
                return None
        return node
