"""Attention over this rank's heads, with grouped-query attention and a paged KV cache.

A step's tokens arrive flattened: sequence i contributes ``query_lens[i]`` new
tokens at positions ``start_pos[i] ..``. Without a KV cache (a plain forward of
whole sequences) attention is causal within each sequence. With a cache, the
new keys/values are first written into the cache through ``slot_mapping``, then
each sequence attends over the blocks listed in its block table.

Cache layout per layer: (2, num_blocks, block_size, local_kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttnBatch:
    query_lens: list[int]  # new tokens per sequence this step
    start_pos: list[int]  # tokens already in the cache per sequence (position of the first new one)
    block_tables: torch.Tensor | None = None  # (num_seqs, max_blocks) int64, padded with 0
    slot_mapping: torch.Tensor | None = None  # (tokens,) int64: block * block_size + offset

    @property
    def context_lens(self) -> list[int]:
        return [s + q for s, q in zip(self.start_pos, self.query_lens)]


class Attention(nn.Module):
    def __init__(self, num_q: int, num_kv: int, head_dim: int):
        super().__init__()
        self.num_q, self.num_kv, self.head_dim = num_q, num_kv, head_dim
        self.scale = head_dim ** -0.5
        self.kv_cache: torch.Tensor | None = None  # set by the worker's KV-cache allocation

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch
                ) -> torch.Tensor:
        # q: (tokens, num_q, head_dim); k, v: (tokens, num_kv, head_dim) -> (tokens, num_q * head_dim)
        if self.kv_cache is None:
            out = self._no_cache(q, k, v, batch)
        else:
            self._write_cache(k, v, batch.slot_mapping)
            out = self._paged(q, batch)
        return out.reshape(out.shape[0], self.num_q * self.head_dim)

    def _no_cache(self, q, k, v, batch: AttnBatch) -> torch.Tensor:
        if any(batch.start_pos):
            raise ValueError("attention without a KV cache needs whole sequences (start_pos 0)")
        outs, begin = [], 0
        for n in batch.query_lens:
            end = begin + n
            outs.append(self._attend(q[begin:end], k[begin:end], v[begin:end], causal_offset=0))
            begin = end
        return torch.cat(outs)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        cache = self.kv_cache.view(2, -1, self.num_kv, self.head_dim)  # (2, slots, num_kv, head_dim)
        cache[0].index_copy_(0, slots, k)
        cache[1].index_copy_(0, slots, v)

    def _paged(self, q: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        decode = all(n == 1 for n in batch.query_lens)
        if decode:
            return self._paged_decode(q, batch)
        outs, begin = [], 0
        for i, (n, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
            k, v = self._gather(batch.block_tables[i:i + 1], ctx)  # each (1, ctx, num_kv, hd)
            outs.append(self._attend(q[begin:begin + n], k[0], v[0], causal_offset=ctx - n))
            begin += n
        return torch.cat(outs)

    def _gather(self, block_tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` cached tokens of each listed sequence."""
        _, _, block_size, num_kv, hd = self.kv_cache.shape
        needed = -(-length // block_size)
        blocks = block_tables[:, :needed].reshape(-1)  # (seqs * needed,)
        rows = self.kv_cache.flatten(2).index_select(1, blocks)  # (2, seqs * needed, bs * kv * hd)
        kv = rows.view(2, block_tables.shape[0], needed * block_size, num_kv, hd)[:, :, :length]
        return kv[0], kv[1]  # each (seqs, length, num_kv, hd)

    def _paged_decode(self, q: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        # one new token per sequence: pad every context to the longest, mask the padding
        ctx = torch.tensor(batch.context_lens)
        longest = int(ctx.max())
        k, v = self._gather(batch.block_tables, longest)  # (seqs, longest, num_kv, hd)
        mask = torch.arange(longest).unsqueeze(0) < ctx.unsqueeze(1)  # (seqs, longest)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (seqs, num_q, 1, hd)
            k.transpose(1, 2), v.transpose(1, 2),  # (seqs, num_kv, longest, hd)
            attn_mask=mask[:, None, None, :], scale=self.scale, enable_gqa=True)
        return out.squeeze(2)  # (seqs, num_q, hd)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int
                ) -> torch.Tensor:
        # q: (n, num_q, hd); k, v: (ctx, num_kv, hd), query j sits at key position offset + j
        n, ctx = q.shape[0], k.shape[0]
        mask = None
        if causal_offset:
            mask = torch.arange(ctx).unsqueeze(0) <= (torch.arange(n) + causal_offset).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (heads, len, hd)
            attn_mask=mask, is_causal=not causal_offset, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)  # (n, num_q, hd)
