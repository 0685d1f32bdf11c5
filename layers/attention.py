"""Attention over this rank's heads, with grouped-query attention and a paged KV cache.

A step's tokens arrive flattened: sequence i contributes ``query_lens[i]`` new
tokens at positions ``start_pos[i] ..``. Without a KV cache (a plain forward of
whole sequences) attention is causal within each sequence. With a cache, the
new keys/values are first written into the cache through ``slot_mapping``, then
each sequence attends over the blocks listed in its block table. How is the platform's
(``self.ops``, see ``layers.ops``): the torch reference attends sequences with one new token
all together and longer chunks one by one; the CUDA kernels take the whole step in one call.

Cache layout per layer: (2, num_blocks, block_size, local_kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import nn

from layers.ops import NATIVE, DecodeGroup, decode_groups, host_tensor


@dataclass
class AttnBatch:
    query_lens: list[int]  # new tokens per sequence this step
    start_pos: list[int]  # tokens already in the cache per sequence (position of the first new one)
    block_tables: torch.Tensor | None = None  # (num_seqs, max_blocks) int64, padded with 0
    slot_mapping: torch.Tensor | None = None  # (tokens,) int64: block * block_size + offset
    _decode_groups: list | None = field(default=None, repr=False)  # built once, used by every layer
    _context_lens: torch.Tensor | None = field(default=None, repr=False)
    _query_starts: torch.Tensor | None = field(default=None, repr=False)
    _split: "SplitBatch | None" = field(default=None, repr=False)
    # what the platform's ops work out once per step for every layer (e.g. the CPU kernels'
    # decode-step arguments)
    platform_state: dict = field(default_factory=dict, repr=False)

    @property
    def context_lens(self) -> list[int]:
        return [s + q for s, q in zip(self.start_pos, self.query_lens)]

    def context_lens_tensor(self) -> torch.Tensor:
        if self._context_lens is None:
            self._context_lens = host_tensor(self.context_lens, self.block_tables.device)
        return self._context_lens

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    def query_starts_tensor(self) -> torch.Tensor:
        """(seqs + 1,) int64: sequence i's new tokens are rows [starts[i], starts[i+1])."""
        if self._query_starts is None:
            self._query_starts = host_tensor(list(accumulate(self.query_lens, initial=0)),
                                             self.block_tables.device)
        return self._query_starts

    def last_tokens(self, seqs: list[int]) -> "AttnBatch":
        """The last new token of each of sequences ``seqs``, attending over their whole
        context from the cache (the final layer where only sampled rows go on)."""
        lens = self.context_lens
        index = host_tensor(seqs, self.block_tables.device)
        return AttnBatch([1] * len(seqs), [lens[i] - 1 for i in seqs],
                         self.block_tables.index_select(0, index))

    def token_rows(self) -> "AttnBatch":
        """Every new token as a sequence of its own that decodes it: its context up to its
        own position, its sequence's block table (deterministic attention on CPUs)."""
        tokens = sum(self.query_lens)
        index = host_tensor([i for i, n in enumerate(self.query_lens) for _ in range(n)],
                            self.block_tables.device)
        return AttnBatch([1] * tokens, [s + j for s, n in zip(self.start_pos, self.query_lens)
                                        for j in range(n)],
                         self.block_tables.index_select(0, index))

    def split(self) -> "SplitBatch":
        """Single-token sequences (attended together) apart from longer chunks; built once."""
        if self._split is None:
            self._split = SplitBatch.of(self)
        return self._split

    def decode_groups(self, block_size: int) -> list[DecodeGroup]:
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
        rows = host_tensor([row for _, row in ones], batch.block_tables.device)
        return cls(decode, rows, chunks)


class Attention(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, num_q: int, num_kv: int, head_dim: int, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None):
        super().__init__()
        self.num_q, self.num_kv, self.head_dim = num_q, num_kv, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window = window  # sliding window: a query sees the keys at positions > its own - window
        self.softcap = softcap  # scores capped to softcap * tanh(score / softcap) (Gemma 2)
        self.kv_cache: torch.Tensor | None = None  # set by the worker's KV-cache allocation

    @property
    def plain(self) -> bool:
        """Full causal attention, uncapped (what every platform kernel covers)."""
        return not self.window and not self.softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch
                ) -> torch.Tensor:
        # q: (tokens, num_q, head_dim); k, v: (tokens, num_kv, head_dim) -> (tokens, num_q * head_dim)
        if self.kv_cache is None:
            out = self._no_cache(q, k, v, batch)
        else:
            self.ops.write_kv(k, v, self.kv_cache, batch.slot_mapping)
            out = self.ops.paged_attention(q, k, v, self.kv_cache, batch, self.scale, self.window,
                                           self.softcap)
        return out.reshape(out.shape[0], self.num_q * self.head_dim)

    def forward_last(self, q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     batch: AttnBatch, last: AttnBatch) -> torch.Tensor:
        """Write every token's keys and values, attend only from the rows in ``last``.

        q_last: (rows, num_q, hd); k, v: (tokens, num_kv, hd) -> (rows, num_q * hd)"""
        self.ops.write_kv(k, v, self.kv_cache, batch.slot_mapping)
        out = self.ops.paged_decode(q_last, self.kv_cache, last, self.scale, self.window,
                                    self.softcap)
        return out.reshape(out.shape[0], self.num_q * self.head_dim)

    def _no_cache(self, q, k, v, batch: AttnBatch) -> torch.Tensor:
        if any(batch.start_pos):
            raise ValueError("attention without a KV cache needs whole sequences (start_pos 0)")
        outs, begin = [], 0
        for n in batch.query_lens:
            end = begin + n
            outs.append(self.ops.attend(q[begin:end], k[begin:end], v[begin:end], self.scale, 0,
                                        self.window, self.softcap))
            begin = end
        return torch.cat(outs)
