"""Head and row splits (docs/ARCHITECTURE.md, "The forward pass": whole KV heads per rank,
unequal shares, replication)."""

from __future__ import annotations

import pytest

from layers.partition import HeadShard, head_shard, padded_vocab_shard, split_sizes


def test_smollm2_head_split_at_tp2_matches_design():
    assert head_shard(9, 3, 2, 0) == HeadShard(q_start=0, num_q=6, kv_start=0, num_kv=2)
    assert head_shard(9, 3, 2, 1) == HeadShard(q_start=6, num_q=3, kv_start=2, num_kv=1)


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, t) for t in range(1, 10)] + [(8, 2, 8), (32, 8, 6)])
def test_every_query_head_owned_once_and_reads_its_own_kv_head(heads, kv, tp):
    group = heads // kv
    owned = []
    for rank in range(tp):
        s = head_shard(heads, kv, tp, rank)
        assert s.num_q >= 1 and s.num_kv >= 1
        q_heads = range(s.q_start, s.q_start + s.num_q)
        owned += q_heads
        assert {q // group for q in q_heads} <= set(range(s.kv_start, s.kv_start + s.num_kv))
    assert sorted(owned) == list(range(heads))


def test_replication_when_tp_exceeds_kv_heads():
    shards = [head_shard(9, 3, 4, r) for r in range(4)]
    assert [s.kv_start for s in shards] == [0, 0, 1, 2]
    assert [s.num_q for s in shards] == [2, 1, 3, 3]


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor_parallel_size=10 exceeds num_attention_heads=9"):
        head_shard(9, 3, 10, 0)


def test_split_sizes_and_vocab_padding():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert [padded_vocab_shard(10, 3, r) for r in range(3)] == [(0, 4, 4), (4, 4, 4), (8, 4, 2)]
