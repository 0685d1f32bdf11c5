"""How tensor-parallel ranks divide heads, rows and the vocabulary.

Every split here is contiguous. Sizes that do not divide evenly go to the
earlier ranks first (10 over 3 ranks: 4, 3, 3).
"""

from __future__ import annotations

from dataclasses import dataclass


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous shares of ``total``, earlier shares larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of share ``index`` of ``total`` split into ``parts``."""
    sizes = split_sizes(total, parts)
    return sum(sizes[:index]), sizes[index]


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank owns."""

    q_start: int  # first query head owned
    num_q: int
    kv_start: int  # first KV head owned
    num_kv: int


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """Whole KV heads per rank, with the query heads that read them.

    tp <= KV heads: KV heads are split contiguously (unequal when tp does not
    divide them) and each rank takes all query heads of its KV heads.
    tp > KV heads: each rank holds one (replicated) KV head and a contiguous
    share of that head's query heads.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                         f"num_key_value_heads={num_kv_heads}")
    if tp_size > num_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} exceeds num_attention_heads={num_heads}: "
                         "every rank needs at least one query head")
    group = num_heads // num_kv_heads
    if tp_size <= num_kv_heads:
        kv_start, num_kv = split_range(num_kv_heads, tp_size, tp_rank)
        return HeadShard(kv_start * group, num_kv * group, kv_start, num_kv)
    kv_head = tp_rank * num_kv_heads // tp_size
    sharing = [r for r in range(tp_size) if r * num_kv_heads // tp_size == kv_head]
    q_offset, num_q = split_range(group, len(sharing), sharing.index(tp_rank))
    return HeadShard(kv_head * group + q_offset, num_q, kv_head, 1)


def padded_vocab_shard(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """(start, padded size per rank, real rows) of a rank's vocabulary slice.

    The vocabulary is padded to a multiple of ``tp_size`` so every rank holds the
    same number of rows (an equal-size gather of the logits); rows past the
    real vocabulary are zero and are cut from the gathered logits.
    """
    per_rank = -(-vocab_size // tp_size)
    start = tp_rank * per_rank
    real = max(0, min(per_rank, vocab_size - start))
    return start, per_rank, real
