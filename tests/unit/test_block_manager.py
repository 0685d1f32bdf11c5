"""BlockManager: free list, reference counts, prefix caching."""

import pytest

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence


def computed(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Pretend a step computed ``seq``'s tokens up to ``upto`` (default: all)."""
    upto = seq.num_tokens if upto is None else upto
    assert bm.ensure_slots(seq, upto)
    seq.num_computed_tokens = upto
    bm.register_full_blocks(seq)


def test_refcounts_free_list_and_usage():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    a, b = Sequence(1, list(range(9))), Sequence(2, list(range(100, 104)))
    assert bm.ensure_slots(a, 9) and len(a.block_table) == 3
    assert bm.ensure_slots(a, 12) and len(a.block_table) == 3  # still fits
    assert bm.ensure_slots(b, 4)
    assert bm.num_free_blocks == 2 and bm.usage == pytest.approx(4 / 6)
    assert len(set(a.block_table) | set(b.block_table)) == 4
    assert all(bm.ref_counts[x] == 1 for x in a.block_table + b.block_table)
    assert not bm.ensure_slots(b, 13)  # needs 3 more, only 2 free: all or nothing
    assert len(b.block_table) == 1 and bm.num_free_blocks == 2
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 5
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0 and set(bm.ref_counts) == {0}


def test_prefix_hits_share_blocks_and_are_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(1, list(range(10)))
    assert bm.allocate_prefix(a) == 0
    computed(bm, a)
    assert bm.prefix_cache_queries == 2 and bm.prefix_cache_hits == 0
    b = Sequence(2, list(range(8)) + [50, 51, 52])
    assert bm.allocate_prefix(b) == 8
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2]
    assert bm.prefix_cache_queries == 4 and bm.prefix_cache_hits == 2
    free_before = bm.num_free_blocks
    assert bm.ensure_slots(b, 11) and bm.num_free_blocks == free_before - 1
    # Same tokens in block 1 but a different block 0: the chain hash must not hit.
    c = Sequence(3, [9, 9, 9, 9] + list(range(4, 8)) + [1])
    assert bm.allocate_prefix(c) == 0 and c.block_table == []


def test_whole_prompt_is_never_cached():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(1, list(range(8)))
    bm.allocate_prefix(a)
    computed(bm, a)
    same = Sequence(2, list(range(8)))
    assert bm.allocate_prefix(same) == 4  # (8 - 1) // 4 * 4: the last token is computed
    longer = Sequence(3, list(range(9)))
    assert bm.allocate_prefix(longer) == 8


def test_freed_blocks_stay_hittable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence(1, [1, 2, 3, 4, 5])
    bm.allocate_prefix(a)
    computed(bm, a)  # blocks: [1,2] [3,4] registered, [5] partial
    first, second = a.block_table[:2]
    cached = {first, second}
    assert bm.cached_block_ids() == cached
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = Sequence(2, [1, 2, 3, 4, 6])
    assert bm.allocate_prefix(b) == 4 and set(b.block_table) == cached
    assert bm.num_free_blocks == 2
    bm.free(b)
    # Unregistered blocks are reused before cached ones; then cached ones, tail
    # of a prefix first (it was freed first), which drops its hash.
    c = Sequence(3, [7, 7, 7, 7, 7, 7])
    assert bm.allocate_prefix(c) == 0
    assert bm.ensure_slots(c, 4) and not set(c.block_table) & cached
    assert bm.ensure_slots(c, 6) and c.block_table[2] == second
    assert bm.cached_block_ids() == {first}
    bm.free(c)
    d = Sequence(4, [1, 2, 3, 4, 5])
    assert bm.allocate_prefix(d) == 2 and d.block_table == [first]


def test_identical_concurrent_blocks_register_once():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = Sequence(1, [1, 2, 3]), Sequence(2, [1, 2, 3])
    bm.allocate_prefix(a), bm.allocate_prefix(b)
    computed(bm, a)
    computed(bm, b)
    assert len(bm.cached_block_ids()) == 1
    assert a.block_hashes == b.block_hashes
    bm.free(a), bm.free(b)
    assert bm.num_free_blocks == 8 and set(bm.ref_counts) == {0}


def test_no_prefix_caching_when_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = Sequence(1, [1, 2, 3])
    bm.allocate_prefix(a)
    computed(bm, a)
    b = Sequence(2, [1, 2, 3])
    assert bm.allocate_prefix(b) == 0 and bm.prefix_cache_queries == 0


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_cancelled_admission_is_not_counted_and_frees():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = Sequence(1, [1, 2, 3, 4, 5])
    bm.allocate_prefix(a)
    computed(bm, a)
    bm.free(a)
    b = Sequence(2, [1, 2, 3, 4, 9])
    queries, hits = bm.prefix_cache_queries, bm.prefix_cache_hits
    assert bm.allocate_prefix(b) == 4
    bm.cancel_admission(b)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (queries, hits)
    assert b.block_table == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 8
    assert bm.allocate_prefix(b) == 4  # the cached blocks are still there
