"""KV-cache block accounting for the driver (plain Python, no torch).

Every worker holds the same ``num_blocks`` blocks of ``block_size`` token
slots (each its own heads' slice), so the driver alone decides which blocks a
sequence uses. Blocks are reference counted so that sequences with a common
prefix share its blocks without copying.

Prefix caching: once a FULL block's KV is computed, the block is registered
under a chain hash ``hash((previous block's hash, tokens in the block))``, so
the hash covers every token up to the end of the block. A new sequence whose
leading full blocks match registered ones starts with those blocks shared
(refcount + 1). A freed block keeps its hash and can still be hit until it is
reused for other tokens; free blocks are reused least recently freed first,
with never-registered blocks ahead of registered ones.

Counters: ``prefix_cache_queries`` counts full prompt blocks looked up at
admission, ``prefix_cache_hits`` the blocks found (both in blocks).
"""

from __future__ import annotations

from collections import OrderedDict

from cluster.engine.sequence import Sequence

_ROOT_HASH = 0x5EED  # the "previous hash" of a sequence's first block


class BlockManager:
    """Free list, reference counts and prefix-cache hashes for KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Per block: the (previous hash, tokens) key it is registered under, or None.
        self._keys: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Free blocks in reuse order (front first); an ordered dict so that a
        # prefix hit can take a block out of the middle.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_cache_hits = 0
        self.prefix_cache_queries = 0

    # ---- queries -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block_ids(self) -> set[int]:
        """Blocks currently registered in the prefix cache (for tests and metrics)."""
        return set(self._hash_to_block.values())

    # ---- allocation ----------------------------------------------------
    def _key(self, prev: int, seq: Sequence, i: int) -> tuple[int, tuple[int, ...]]:
        bs = self.block_size
        return (prev, tuple(seq.all_token_ids[i * bs:(i + 1) * bs]))

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a newly admitted ``seq`` its cached leading blocks.

        Returns the number of cached tokens, which is also set as
        ``seq.num_computed_tokens``. At least the last token is left to compute,
        so at most ``(num_tokens - 1) // block_size`` blocks are hit.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        # a sequence that scores its prompt computes all of it (prompt_logprobs)
        if self.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None:
            n_query = (seq.num_tokens - 1) // self.block_size
            self.prefix_cache_queries += n_query
            prev = _ROOT_HASH
            for i in range(n_query):
                key = self._key(prev, seq, i)
                h = hash(key)
                b = self._hash_to_block.get(h)
                if b is None or self._keys[b] != key:
                    break
                if self.ref_counts[b] == 0:
                    del self._free[b]
                self.ref_counts[b] += 1
                seq.block_table.append(b)
                seq.block_hashes.append(h)
                prev = h
            self.prefix_cache_hits += len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def ensure_slots(self, seq: Sequence, upto_num_tokens: int) -> bool:
        """Grow ``seq.block_table`` to hold ``upto_num_tokens`` tokens.

        All or nothing: returns False, allocating nothing, when too few blocks
        are free.
        """
        missing = self.blocks_needed(upto_num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        for _ in range(missing):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def release_tail(self, seq: Sequence, upto_num_tokens: int) -> None:
        """Free the blocks of ``seq`` past the ones holding its first ``upto_num_tokens``
        tokens (slots taken for guesses that were rejected)."""
        keep = self.blocks_needed(upto_num_tokens)
        for b in reversed(seq.block_table[keep:]):
            self._release(b)
        del seq.block_table[keep:]

    def _release(self, b: int) -> None:
        self.ref_counts[b] -= 1
        if self.ref_counts[b] < 0:
            raise RuntimeError(f"block {b} freed more often than allocated")
        if self.ref_counts[b] == 0:
            self._free[b] = None
            if self._hashes[b] is None:  # nothing worth keeping: reuse it first
                self._free.move_to_end(b, last=False)

    def _forget(self, b: int) -> None:
        """Drop block ``b``'s prefix-cache entry (it is about to hold new tokens)."""
        h = self._hashes[b]
        if h is not None and self._hash_to_block.get(h) == b:
            del self._hash_to_block[h]
        self._hashes[b] = None
        self._keys[b] = None

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly computed full blocks so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else _ROOT_HASH
        for i in range(len(seq.block_hashes), n_full):
            key = self._key(prev, seq, i)
            h = hash(key)
            b = seq.block_table[i]
            if h not in self._hash_to_block and self._hashes[b] is None:
                self._hash_to_block[h] = b
                self._hashes[b] = h
                self._keys[b] = key
            seq.block_hashes.append(h)
            prev = h

    def cancel_admission(self, seq: Sequence) -> None:
        """Undo :meth:`allocate_prefix` (and any slots) for a sequence that could
        not be admitted after all; its lookup is not counted, so a sequence that
        waits several steps for memory is counted once."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries -= (seq.num_tokens - 1) // self.block_size
            self.prefix_cache_hits -= seq.num_cached_tokens // self.block_size
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (their KV content is gone, e.g. after the
        workers were restarted). Sequences holding blocks keep them, unhashed."""
        for b in range(self.num_blocks):
            self._hashes[b] = None
            self._keys[b] = None
        self._hash_to_block.clear()

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (tail first, so a prefix outlives its tail)."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.block_hashes = []
