"""The device-generic path: every op a layer needs, in torch's own kernels.

The platform is chosen once per worker (:func:`layers.platform.select_ops`), not per
call: the layers call ``self.ops.<op>`` and never look at the device themselves.
:class:`TorchOps` runs on any device torch runs on (CPU, CUDA) and is the reference the
CPU path (:class:`layers.cpu.ops.CpuOps`, C kernels) is tested against. A layer's
``ops`` is :data:`NATIVE` until :func:`layers.platform.use_ops` sets the worker's choice.

Paged KV cache layout per layer: (2, num_blocks, block_size, local_kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The decode path gathers keys per group of sequences: small enough that a layer's gathered
# K/V (tokens x kv heads x head_dim x 2) stays in the CPU's cache between the gather and
# the attention reading it.
DECODE_GROUP_TOKENS = 4096


class TorchOps:
    """torch's kernels, on whatever device the tensors live on."""

    name = "torch"
    graph_safe = False  # decode steps read host values (Python lists): never graph-captured
    activation_dtype: torch.dtype | None = None  # hidden states: None, the weights' dtype
    kv_cache_dtype: torch.dtype | None = None  # None: the activations' dtype

    def prepare(self, model: nn.Module) -> int:
        """Rearrange loaded weights for this platform's kernels; how many were changed."""
        return 0

    # ---- matmuls and lookups -----------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # x: (rows, in); weight: (out, in) -> (rows, out), of ``out_dtype`` where given
        y = F.linear(x, weight, bias)
        return y if out_dtype is None else y.to(out_dtype)

    def embedding(self, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # index: (n,); weight: (rows, hidden) -> (n, hidden)
        return F.embedding(index, weight)

    # ---- small per-layer ops ------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # x: (tokens, hidden); normalised in float32 like the reference implementation
        if x.dtype == torch.float32 == weight.dtype:
            return F.rms_norm(x, weight.shape, weight, eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual); all (tokens, hidden)."""
        total = x + residual
        return self.rms_norm(total, weight, eps), total

    def rotate_(self, heads: torch.Tensor, rotary, positions: torch.Tensor) -> None:
        """Rotate ``heads`` (tokens, n, head_dim) in place by ``rotary``'s angles at
        ``positions`` (tokens,)."""
        cos, sin = rotary.cos_sin(positions, full=True)  # (tokens, 1, head_dim) each
        heads.copy_(rotate(heads, cos, sin))

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (rows, n) -> each row's largest value (rows,) and its first index (rows,) int64
        return x.max(dim=-1)

    def gumbel_argmax(self, x: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                      temps: torch.Tensor) -> torch.Tensor | None:
        # Gumbel-max sampling with the sampler's noise (layers.sampler): x (rows, vocab)
        # float32, -inf excluded; seeds, positions (rows,) int64, temps (rows,) float32 ->
        # (rows,) int64; None: the sampler computes it with torch's ops itself
        return None

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: (rows, 2 * inter) -> (rows, inter)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: (rows, 2 * inter) -> (rows, inter): GELU (tanh approximation) of gate, times up
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def swiglu(self, gate_up: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the merged gate/up projection of ``x``, as the down projection
        takes it (a platform may hand it over in a narrower dtype).

        x: (rows, hidden) -> (rows, inter)"""
        return self.silu_mul(gate_up.project(x))

    def attention_dtype(self, attn: nn.Module, batch) -> torch.dtype | None:
        """The dtype a step's queries, keys and values travel in, from the q/k/v projection of
        ``attn`` (a layer's self-attention) to its output projection, where the platform
        carries them narrower than the activations; None: the activations' dtype."""
        return None

    def fused_decode(self, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, batch
                     ) -> torch.Tensor | None:
        """A whole decoder layer for a step where every sequence decodes one token, where the
        platform has such a kernel; None: run the layer op by op."""
        return None

    # ---- attention over the paged KV cache -------------------------------------------------
    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError where this platform cannot attend over blocks of ``block_size``
        tokens (called when the cache is allocated)."""

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
        # k, v: (tokens, num_kv, hd); slots: (tokens,) int64 block * block_size + offset
        flat = cache.view(2, -1, *cache.shape[3:])  # (2, slots, num_kv, hd)
        flat[0].index_copy_(0, slots, k.to(cache.dtype))  # a narrower cache: rounded here
        flat[1].index_copy_(0, slots, v.to(cache.dtype))

    def paged_decode(self, q: torch.Tensor, cache: torch.Tensor, batch, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """One new token per sequence of ``batch`` attending over its cached context (with a
        ``window``, over its last ``window`` keys only; ``softcap``: scores capped to
        ``softcap * tanh(score / softcap)`` before the softmax).

        q: (seqs, num_q, hd) -> (seqs, num_q, hd)"""
        groups = batch.decode_groups(cache.shape[2])
        if len(groups) == 1 and groups[0].rows is None:
            return _decode_group(q, cache, groups[0], scale, window, softcap)
        out = torch.empty_like(q)
        for group in groups:
            rows = group.rows
            out.index_copy_(0, rows, _decode_group(q.index_select(0, rows), cache, group, scale,
                                                   window, softcap))
        return out

    def paged_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: torch.Tensor, batch, scale: float, window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
        """Every sequence of a step (its new keys and values already written to ``cache``)
        attending over its context: the single-token sequences together, each longer chunk
        on its own (a prompt's first chunk over its own keys, no gather). ``window`` and
        ``softcap``: as :meth:`paged_decode`.

        q: (tokens, num_q, hd); k, v: (tokens, num_kv, hd) -> (tokens, num_q, hd)"""
        split = batch.split()
        if split.decode is batch:  # every sequence decodes one token
            return self.paged_decode(q, cache, batch, scale, window, softcap)
        out = torch.empty_like(q)
        if split.decode is not None:  # the single-token sequences of a mixed step, together
            rows = split.decode_rows
            out.index_copy_(0, rows, self.paged_decode(q.index_select(0, rows), cache,
                                                       split.decode, scale, window, softcap))
        for i, begin, n, ctx in split.chunks:
            if ctx == n:  # a prompt's first chunk: its own keys are the whole context
                keys, values = k[begin:begin + n], v[begin:begin + n]
            else:  # continues a sequence: read the earlier tokens from the cache
                keys, values = (t[0] for t in gather_kv(cache, batch.block_tables[i:i + 1], ctx))
            out[begin:begin + n] = self.attend(q[begin:begin + n], keys, values, scale, ctx - n,
                                               window, softcap)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int, window: int | None = None, softcap: float | None = None
               ) -> torch.Tensor:
        """Causal attention of n queries over ctx keys, query j at key position offset + j
        (with a ``window``: over keys at positions > its own - window; ``softcap``: as
        :meth:`paged_decode`).

        q: (n, num_q, hd); k, v: (ctx, num_kv, hd) -> (n, num_q, hd)"""
        n, ctx = q.shape[0], k.shape[0]
        mask = None
        if causal_offset or window:
            new = torch.arange(n, device=q.device) + causal_offset  # (n,) query positions
            keys = torch.arange(ctx, device=q.device).unsqueeze(0)  # (1, ctx)
            mask = keys <= new.unsqueeze(1)  # (n, ctx)
            if window:
                mask &= keys > new.unsqueeze(1) - window
        out = attention(  # 4-d inputs: the flash kernel, not the math path
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, heads, len, hd)
            mask, scale, softcap)
        return out[0].transpose(0, 1)  # (n, num_q, hd)


NATIVE = TorchOps()  # stateless: the default of every layer


def host_tensor(values: list, device: torch.device, dtype: torch.dtype = torch.int64
                ) -> torch.Tensor:
    """A step's host-side values (indices, lengths) as a tensor on ``device``: on CUDA built
    in pinned host memory and copied without blocking the host, elsewhere made in place."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T [capped], masked) v over grouped-query heads; ``mask`` None:
    causal. Soft-capped scores are computed in float32 like the reference implementations
    (torch's fused attention has no cap).

    q: (b, num_q, lq, hd); k, v: (b, num_kv, lk, hd); mask: (b or 1, 1, lq, lk) bool, True
    where a key is seen -> (b, num_q, lq, hd)"""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))  # (b, num_q, lk, hd)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # (b, num_q, lq, lk)
    scores = soft_cap(scores, softcap)
    if mask is None:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's scores and logits); x itself when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's half rotation. x: (..., hd); cos, sin broadcast to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first ``length`` cached tokens of each listed sequence.

    block_tables: (seqs, max_blocks) -> k, v each (seqs, length, num_kv, hd)"""
    _, _, block_size, num_kv, hd = cache.shape
    needed = -(-length // block_size)
    blocks = block_tables[:, :needed].reshape(-1)  # (seqs * needed,)
    rows = cache.flatten(2).index_select(1, blocks)  # (2, seqs * needed, bs * kv * hd)
    kv = rows.view(2, block_tables.shape[0], needed * block_size, num_kv, hd)[:, :, :length]
    return kv[0], kv[1]


@dataclass
class DecodeGroup:
    """Decoding sequences of similar context length, attended together (padded to the longest)."""

    rows: torch.Tensor | None  # (n,) their rows in the batch; None: all rows, in order
    block_tables: torch.Tensor  # (n, blocks)
    length: int  # the longest context among them
    mask: torch.Tensor  # (n, 1, 1, length) bool, True for keys inside each sequence's context
    lens: torch.Tensor  # (n, 1, 1, 1) int64 context lengths
    windowed: dict = field(default_factory=dict)  # window -> its mask, made once a step

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask of keys seen: inside the context and, with a ``window``, among its last
        ``window`` keys (the new token at position len - 1 sees positions > len - 1 - window)."""
        if not window or window >= self.length:
            return self.mask
        if window not in self.windowed:
            keys = torch.arange(self.length, device=self.mask.device)
            self.windowed[window] = self.mask & (keys >= self.lens - window)
        return self.windowed[window]


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
    return [_group(g, context_lens, block_tables, block_size, len(groups) == 1
                   and g == list(range(len(context_lens))))
            for g in groups]


def _group(members: list[int], context_lens: list[int], block_tables: torch.Tensor,
           block_size: int, whole_batch: bool) -> DecodeGroup:
    device = block_tables.device
    lens = host_tensor([context_lens[i] for i in members], device)
    longest = max(context_lens[i] for i in members)
    rows = None if whole_batch else host_tensor(members, device)
    tables = block_tables if rows is None else block_tables.index_select(0, rows)
    mask = torch.arange(longest, device=device).unsqueeze(0) < lens.unsqueeze(1)  # (n, longest)
    return DecodeGroup(rows, tables[:, :-(-longest // block_size)], longest, mask[:, None, None, :],
                       lens[:, None, None, None])


def _decode_group(q: torch.Tensor, cache: torch.Tensor, group: DecodeGroup, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    # q: (n, num_q, hd) -> (n, num_q, hd); contexts padded to the group's longest, masked
    k, v = gather_kv(cache, group.block_tables, group.length)  # (n, length, num_kv, hd)
    k, v = k.to(q.dtype), v.to(q.dtype)  # no copy unless the cache is narrower than q
    out = attention(q.unsqueeze(2),  # (n, num_q, 1, hd)
                    k.transpose(1, 2), v.transpose(1, 2),  # (n, num_kv, length, hd)
                    group.mask_for(window), scale, softcap)
    return out.squeeze(2)
