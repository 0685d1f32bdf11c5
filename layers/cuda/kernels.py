"""Triton kernels over the paged KV cache.

Cache layout per layer: (2, num_blocks, block_size, num_kv, head_dim), keys then values.

- :func:`write_kv`: the step's new keys and values into their slots, both in one launch;
  a negative slot is skipped (the padding rows of a CUDA-graph batch).
- :func:`paged_attention`: every sequence of a step at once, whatever its number of new
  tokens (decode rows, prompt chunks, continued chunks): query ``j`` of sequence ``i`` sits
  at position ``context_lens[i] - query_len[i] + j`` and attends causally over the cached
  keys of its sequence, read block by block through the block table with an online softmax.
  One program covers one KV head and a tile of queries with all the query heads that share
  that KV head (grouped-query attention reads each key once per tile). A sequence with
  context 0 (a padding row) reads nothing and writes zeros.

The kernels read no host value: a step's shape decides only the launch grid, so a decode
step can be captured in a CUDA graph. Triton's interpreter (``TRITON_INTERPRET=1``) runs
them on CPU tensors, which is how the CPU test suite checks them against the torch
reference (:class:`layers.ops.TorchOps`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot needs every dimension >= 16 when compiled for a GPU


def takes_block_size(block_size: int) -> bool:
    """A power of two of at least 16 tokens."""
    return block_size >= MIN_DOT and block_size & (block_size - 1) == 0


def supports(cache: torch.Tensor) -> bool:
    """Whether these kernels take this cache: a block size :func:`takes_block_size` and
    contiguous head rows."""
    return takes_block_size(cache.shape[2]) and cache.stride(-1) == 1


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt,
                     stride_vh, stride_kv, stride_slot, stride_head,
                     NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, KV_PAD: tl.constexpr,
                     D_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    h = tl.arange(0, KV_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    live = (tl.zeros([KV_PAD, D_PAD], tl.int64) + slot) >= 0  # a negative slot: skipped
    mask = (h < NUM_KV) & (d < HEAD_DIM) & live
    k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + slot * stride_slot + h * stride_head + d
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_kv, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v: (tokens, num_kv, hd), last dim contiguous; slots: (tokens,) int64, -1 = skip."""
    tokens, num_kv, hd = k.shape
    if tokens == 0:
        return
    flat = cache.view(2, -1, num_kv, hd)  # (2, slots, num_kv, hd)
    _write_kv_kernel[(tokens,)](
        k, v, cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        flat.stride(0), flat.stride(1), flat.stride(2),
        NUM_KV=num_kv, HEAD_DIM=hd, KV_PAD=triton.next_power_of_2(num_kv),
        D_PAD=triton.next_power_of_2(hd))


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, starts_ptr, context_ptr, scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_block, stride_pos,
        stride_head,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_begin = tl.load(starts_ptr + seq)
    q_len = tl.load(starts_ptr + seq + 1) - q_begin
    ctx = tl.load(context_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # (M,): query index major, head of the group minor
    qi = tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (qi < q_len) & (rows % GROUP_PAD < GROUP)
    pos = ctx - q_len + qi  # (M,) each query's position in its sequence
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (q_begin + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)  # (M, D_PAD)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], tl.float32)
    keys_seen = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_Q)  # causal bound of the tile
    num_blocks = tl.where(tile * BLOCK_Q < q_len, tl.cdiv(keys_seen, BLOCK_SIZE), 0)
    first_block = 0
    if WINDOW > 0:  # sliding window: no key before the tile's first query's window
        first_block = tl.maximum(ctx - q_len + tile * BLOCK_Q - WINDOW + 1, 0) // BLOCK_SIZE
    n = tl.arange(0, BLOCK_SIZE)
    for b in range(first_block, num_blocks):
        block = tl.load(tables_ptr + seq * stride_table + b)
        offs = block * stride_block + n[:, None] * stride_pos + kv_head * stride_head + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=d_ok[None, :], other=0.0)  # (BLOCK_SIZE, D_PAD)
        v = tl.load(v_cache_ptr + offs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (M, BLOCK_SIZE)
        if SOFTCAP > 0:  # SOFTCAP * tanh(s / SOFTCAP), tanh(x) = 2 sigmoid(2x) - 1
            s = SOFTCAP * (2.0 / (1.0 + tl.exp(-2.0 * s / SOFTCAP)) - 1.0)
        key_pos = b * BLOCK_SIZE + n
        seen = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] < ctx)
        if WINDOW > 0:
            seen = seen & (key_pos[None, :] > pos[:, None] - WINDOW)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_begin + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                    query_starts: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    max_query_len: int, window: int | None = None,
                    softcap: float | None = None, fixed_tiles: bool = False) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context (``window``:
    each query over the keys at positions > its own - window; ``softcap``: scores capped to
    ``softcap * tanh(score / softcap)``).

    q: (tokens, num_q, hd), last dim contiguous; cache: (2, blocks, block_size, num_kv, hd);
    block_tables: (seqs, max_blocks) int64; query_starts: (seqs + 1,) int64, sequence i's
    queries are rows [starts[i], starts[i+1]); context_lens: (seqs,) int64 including the
    new tokens; max_query_len: the longest query run (sets the grid only); fixed_tiles: the
    prompt steps' tile shape for decode steps too (deterministic mode: a query's dot
    products then have one shape whatever the step holds)
    -> (tokens, num_q, hd)"""
    tokens, num_q, hd = q.shape
    _, _, block_size, num_kv, _ = cache.shape
    out = torch.empty((tokens, num_q, hd), dtype=q.dtype, device=q.device)
    seqs = block_tables.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    group = num_q // num_kv
    group_pad = triton.next_power_of_2(group)
    if max_query_len == 1 and not fixed_tiles:  # decode: one query per program, its head group padded for tl.dot
        block_q, group_pad = 1, max(group_pad, MIN_DOT)
    else:  # about 64 query rows (tokens x heads of the group) per program
        block_q = max(1, 64 // group_pad)
    grid = (seqs, num_kv, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, cache[0], cache[1], out, block_tables, query_starts, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        cache.stride(1), cache.stride(2), cache.stride(3),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_SIZE=block_size,
        HEAD_DIM=hd, D_PAD=max(triton.next_power_of_2(hd), MIN_DOT),
        PRECISION="ieee",  # fp32 stays fp32 (no TF32)
        WINDOW=int(window or 0), SOFTCAP=float(softcap or 0.0))
    return out
