"""Attention over this rank's heads, with grouped-query attention and a paged KV cache.

A step's tokens arrive flattened: sequence i contributes ``query_lens[i]`` new
tokens at positions ``start_pos[i] ..``. Without a KV cache (a plain forward of
whole sequences) attention is causal within each sequence. With a cache, the
new keys/values are first written into the cache through ``slot_mapping``, then
each sequence attends over the blocks listed in its block table: sequences with one
new token all together (on CPUs through the C kernel of ``layers.cpu_kernels``, which
reads the blocks in place; elsewhere by gathering them, in groups of similar length),
longer chunks one by one (a prompt's first chunk over its own keys, no gather).

Cache layout per layer: (2, num_blocks, block_size, local_kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layers import cpu_kernels


@dataclass
class AttnBatch:
    query_lens: list[int]  # new tokens per sequence this step
    start_pos: list[int]  # tokens already in the cache per sequence (position of the first new one)
    block_tables: torch.Tensor | None = None  # (num_seqs, max_blocks) int64, padded with 0
    slot_mapping: torch.Tensor | None = None  # (tokens,) int64: block * block_size + offset
    _decode_groups: list | None = field(default=None, repr=False)  # built once, used by every layer
    _context_lens: torch.Tensor | None = field(default=None, repr=False)
    _split: "SplitBatch | None" = field(default=None, repr=False)
    # the decode step's arguments of the CPU layer kernels (cpu_decode_layer.DecodeStep, or False
    # where they do not apply), made by the first layer for all of them
    kernel_step: object = field(default=None, repr=False)

    @property
    def context_lens(self) -> list[int]:
        return [s + q for s, q in zip(self.start_pos, self.query_lens)]

    def context_lens_tensor(self) -> torch.Tensor:
        if self._context_lens is None:
            self._context_lens = torch.tensor(self.context_lens, dtype=torch.int64)
        return self._context_lens

    def last_tokens(self, seqs: list[int]) -> "AttnBatch":
        """The last new token of each of sequences ``seqs``, attending over their whole
        context from the cache (the final layer where only sampled rows go on)."""
        lens = self.context_lens
        return AttnBatch([1] * len(seqs), [lens[i] - 1 for i in seqs],
                         self.block_tables.index_select(0, torch.tensor(seqs, dtype=torch.int64)))

    def split(self) -> "SplitBatch":
        """Single-token sequences (attended together) apart from longer chunks; built once."""
        if self._split is None:
            self._split = SplitBatch.of(self)
        return self._split

    def decode_groups(self, block_size: int) -> list["DecodeGroup"]:
        if self._decode_groups is None:
            self._decode_groups = decode_groups(self.context_lens, self.block_tables, block_size)
        return self._decode_groups


@dataclass(frozen=True)
class KeepRows:
    """The rows whose final hidden states are wanted (the sampled tokens) and the index of
    each one's sequence in the step's AttnBatch."""

    rows: torch.Tensor  # (kept,) int64 token rows
    seqs: list[int]  # (kept,) sequence indices


@dataclass
class SplitBatch:
    decode: AttnBatch | None  # the sequences with one new token (the batch itself if all are)
    decode_rows: torch.Tensor | None  # (n,) their token rows in the step
    chunks: list[tuple[int, int, int, int]]  # the others: (sequence, first row, tokens, context)

    @classmethod
    def of(cls, batch: AttnBatch) -> "SplitBatch":
        ones, chunks, begin = [], [], 0
        for i, (n, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
            if n == 1:
                ones.append((i, begin))
            else:
                chunks.append((i, begin, n, ctx))
            begin += n
        if not chunks:
            return cls(batch, None, [])
        if not ones:
            return cls(None, None, chunks)
        decode = batch.last_tokens([i for i, _ in ones])
        return cls(decode, torch.tensor([row for _, row in ones]), chunks)


# The PyTorch decode path (where the C kernel does not apply) gathers keys per group of
# sequences: small enough that a layer's gathered K/V (tokens x kv heads x head_dim x 2)
# stays in the CPU's cache between the gather and the attention reading it.
DECODE_GROUP_TOKENS = 4096


@dataclass
class DecodeGroup:
    """Decoding sequences of similar context length, attended together (padded to the longest)."""

    rows: torch.Tensor | None  # (n,) their rows in the batch; None: all rows, in order
    block_tables: torch.Tensor  # (n, blocks)
    length: int  # the longest context among them
    mask: torch.Tensor  # (n, 1, 1, length) bool, True for keys inside each sequence's context


def decode_groups(context_lens: list[int], block_tables: torch.Tensor, block_size: int,
                  budget: int = DECODE_GROUP_TOKENS) -> list[DecodeGroup]:
    """Sort the sequences by context length and cut them into groups of at most ``budget``
    padded keys (at least one sequence each), so that padding stays small and each group's
    gathered keys fit in cache."""
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    groups, members = [], []
    for i in order:  # ascending: the newest member is the group's longest
        if members and (len(members) + 1) * context_lens[i] > budget:
            groups.append(members)
            members = []
        members.append(i)
    groups.append(members)
    return [_decode_group(g, context_lens, block_tables, block_size, len(groups) == 1
                          and g == list(range(len(context_lens))))
            for g in groups]


def _decode_group(members: list[int], context_lens: list[int], block_tables: torch.Tensor,
                  block_size: int, whole_batch: bool) -> DecodeGroup:
    lens = torch.tensor([context_lens[i] for i in members])
    longest = int(lens.max())
    rows = None if whole_batch else torch.tensor(members)
    tables = block_tables if rows is None else block_tables.index_select(0, rows)
    mask = torch.arange(longest).unsqueeze(0) < lens.unsqueeze(1)  # (n, longest)
    return DecodeGroup(rows, tables[:, :-(-longest // block_size)], longest, mask[:, None, None, :])


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
            out = self._paged(q, k, v, batch)
        return out.reshape(out.shape[0], self.num_q * self.head_dim)

    def forward_last(self, q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     batch: AttnBatch, last: AttnBatch) -> torch.Tensor:
        """Write every token's keys and values, attend only from the rows in ``last``.

        q_last: (rows, num_q, hd); k, v: (tokens, num_kv, hd) -> (rows, num_q * hd)"""
        self._write_cache(k, v, batch.slot_mapping)
        out = self._paged_decode(q_last, last)
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
        if cpu_kernels.write_kv(k, v, self.kv_cache, slots):
            return
        cache = self.kv_cache.view(2, -1, self.num_kv, self.head_dim)  # (2, slots, num_kv, head_dim)
        cache[0].index_copy_(0, slots, k)
        cache[1].index_copy_(0, slots, v)

    def _paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch
               ) -> torch.Tensor:
        split = batch.split()
        if split.decode is batch:  # every sequence decodes one token
            return self._paged_decode(q, batch)
        out = torch.empty_like(q)  # (tokens, num_q, hd)
        if split.decode is not None:  # the single-token sequences of a mixed step, together
            rows = split.decode_rows
            out.index_copy_(0, rows, self._paged_decode(q.index_select(0, rows), split.decode))
        for i, begin, n, ctx in split.chunks:
            if ctx == n:  # a prompt's first chunk: its own keys are the whole context
                keys, values = k[begin:begin + n], v[begin:begin + n]
            else:  # continues a sequence: read the earlier tokens from the cache
                keys, values = (t[0] for t in self._gather(batch.block_tables[i:i + 1], ctx))
            out[begin:begin + n] = self._attend(q[begin:begin + n], keys, values, ctx - n)
        return out

    def _gather(self, block_tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` cached tokens of each listed sequence."""
        _, _, block_size, num_kv, hd = self.kv_cache.shape
        needed = -(-length // block_size)
        blocks = block_tables[:, :needed].reshape(-1)  # (seqs * needed,)
        rows = self.kv_cache.flatten(2).index_select(1, blocks)  # (2, seqs * needed, bs * kv * hd)
        kv = rows.view(2, block_tables.shape[0], needed * block_size, num_kv, hd)[:, :, :length]
        return kv[0], kv[1]  # each (seqs, length, num_kv, hd)

    def _paged_decode(self, q: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        # q: (seqs, num_q, hd), one new token per sequence -> (seqs, num_q, hd)
        out = cpu_kernels.paged_decode_attention(q, self.kv_cache, batch.block_tables,
                                                 batch.context_lens_tensor(), self.scale)
        if out is not None:  # the C kernel reads the blocks in place
            return out
        groups = batch.decode_groups(self.kv_cache.shape[2])
        if len(groups) == 1 and groups[0].rows is None:
            return self._decode_group(q, groups[0])
        out = torch.empty_like(q)
        for group in groups:
            out.index_copy_(0, group.rows, self._decode_group(q.index_select(0, group.rows), group))
        return out

    def _decode_group(self, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        # q: (n, num_q, hd) -> (n, num_q, hd); contexts padded to the group's longest, masked
        k, v = self._gather(group.block_tables, group.length)  # (n, length, num_kv, hd)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (n, num_q, 1, hd)
            k.transpose(1, 2), v.transpose(1, 2),  # (n, num_kv, length, hd)
            attn_mask=group.mask, scale=self.scale, enable_gqa=True)
        return out.squeeze(2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int
                ) -> torch.Tensor:
        # q: (n, num_q, hd); k, v: (ctx, num_kv, hd), query j sits at key position offset + j
        n, ctx = q.shape[0], k.shape[0]
        if ctx == n + causal_offset:  # the C kernel covers the causal case it is given here
            out = cpu_kernels.prefill_attention(q, k, v, self.scale)
            if out is not None:
                return out
        mask = None
        if causal_offset:
            mask = torch.arange(ctx).unsqueeze(0) <= (torch.arange(n) + causal_offset).unsqueeze(1)
        out = F.scaled_dot_product_attention(  # 4-d inputs: CPU's flash kernel, not the math path
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, heads, len, hd)
            attn_mask=mask, is_causal=not causal_offset, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # (n, num_q, hd)
