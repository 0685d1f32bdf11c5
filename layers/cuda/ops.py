"""The CUDA platform's ops: the paged KV cache through the triton kernels of
:mod:`layers.cuda.kernels`, the rest torch's own kernels (:class:`layers.ops.TorchOps`).

A step's attention is one launch for the whole batch (decode rows, prompt chunks and
continued chunks alike) plus one for the KV append, whatever the batch holds; the tensors
the kernels read (query starts, context lengths) are made once per step on the device and
shared by every layer. A cache whose block size the kernels do not take (below 16 or not a
power of two) falls back to the torch reference.

``deterministic``: the matmuls and RMS norms through the batch-invariant kernels of
:mod:`layers.cuda.invariant`, attention in one tile shape for every step; a cache the
attention kernel does not take is refused instead of falling back.
"""

from __future__ import annotations

import torch

from layers.cuda import invariant, kernels
from layers.ops import TorchOps


class CudaOps(TorchOps):
    name = "cuda-triton"
    graph_safe = True  # a decode step reads no host value: CUDA graphs may capture it

    def __init__(self, deterministic: bool = False):
        self.deterministic = deterministic

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.deterministic:
            return super().linear(x, weight, bias, out_dtype)
        return invariant.matmul(x, weight, bias, out_dtype)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self.deterministic:
            return super().rms_norm(x, weight, eps)
        return invariant.rms_norm(x, weight, eps)

    def check_block_size(self, block_size: int) -> None:
        if self.deterministic and not kernels.takes_block_size(block_size):
            raise ValueError(
                f"model.deterministic: the triton attention kernel takes KV blocks of a power "
                f"of two >= {kernels.MIN_DOT} tokens, not {block_size} (cache.block_size); "
                f"torch's attention it would fall back to is not batch-invariant")

    def _takes(self, cache: torch.Tensor) -> bool:
        if kernels.supports(cache):
            return True
        self.check_block_size(cache.shape[2])
        if self.deterministic:
            raise ValueError("model.deterministic: the triton attention kernel takes contiguous "
                             "KV head rows only")
        return False

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
        # k, v: (tokens, num_kv, hd); slots: (tokens,) int64, -1: skip the row
        if not self._takes(cache):
            return super().write_kv(k, v, cache, slots)
        kernels.write_kv(k, v, cache, slots)

    def paged_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: torch.Tensor, batch, scale: float, window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
        # q: (tokens, num_q, hd) -> (tokens, num_q, hd), one launch for the step
        if not self._takes(cache):
            return super().paged_attention(q, k, v, cache, batch, scale, window, softcap)
        return kernels.paged_attention(q, cache, batch.block_tables, batch.query_starts_tensor(),
                                       batch.context_lens_tensor(), scale, batch.max_query_len,
                                       window, softcap, self.deterministic)

    def paged_decode(self, q: torch.Tensor, cache: torch.Tensor, batch, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        # q: (seqs, num_q, hd), one new token per sequence of ``batch`` -> (seqs, num_q, hd)
        if not self._takes(cache):
            return super().paged_decode(q, cache, batch, scale, window, softcap)
        return kernels.paged_attention(q, cache, batch.block_tables, batch.query_starts_tensor(),
                                       batch.context_lens_tensor(), scale, 1, window, softcap,
                                       self.deterministic)
