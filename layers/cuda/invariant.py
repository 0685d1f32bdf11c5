"""Batch-invariant triton kernels for deterministic mode on CUDA workers.

A row's result must not depend on how many other rows the step holds nor on where in the
batch the row sits. torch's own GEMM and reduction kernels do not promise that: cuBLAS
picks its tiling and split-K by the matrix shape, and a row reduction may be split across
threads differently when there are few rows. These kernels fix every choice that touches
a row's sums:

- :func:`matmul`: one tile shape for every call (``BLOCK_M`` x ``BLOCK_N``, ``BLOCK_K``
  deep), no split-K, the K loop in one order; each output is its row's dot product
  accumulated in float32 tile by tile, whatever the number of rows (the row count is not
  specialised on, so a step of one row compiles to the same code as one of 64).
- :func:`rms_norm`: a fixed number of rows per program, each row's squares summed in
  chunks of a fixed width in one order, then across the chunk in one fixed tree.

The paged attention kernel (:mod:`layers.cuda.kernels`) is invariant already when it runs
one tile shape for decode and prompt steps alike (``fixed_tiles``): each query's keys are
read block by block in position order, with no split over the context.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64
NORM_ROWS, NORM_CHUNK = 8, 512


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                    mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :],
                    mask=(cols[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), float32 accumulation, written once in ``out_dtype`` (default:
    x's dtype). x: (rows, in); weight: (out, in) -> (rows, out)"""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"matmul: input width {x.shape[-1]} against weight {tuple(weight.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m and n:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _matmul_kernel[grid](
            x2, weight, bias if bias is not None else weight, out, m, n, k, x2.stride(0),
            weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            PRECISION="ieee", BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out.reshape(*lead, n)


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, stride_x, stride_o, N, eps,
                     ROWS: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    cols = tl.arange(0, CHUNK)[None, :]  # (1, CHUNK)
    live = r < rows
    squares = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in range(0, N, CHUNK):
        x = tl.load(x_ptr + r * stride_x + c + cols, mask=live & (c + cols < N),
                    other=0.0).to(tl.float32)
        squares += x * x
    scale = 1.0 / tl.sqrt(tl.sum(squares, 1) / N + eps)  # (ROWS,): each row on its own
    for c in range(0, N, CHUNK):
        ok = live & (c + cols < N)
        x = tl.load(x_ptr + r * stride_x + c + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c + cols, mask=c + cols < N, other=0.0).to(tl.float32)
        # normalised in float32, rounded to the activations' dtype, then scaled (as torch's
        # reference path does it)
        y = (x * scale[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(out_ptr + r * stride_o + c + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (rows, hidden) -> (rows, hidden) of x's dtype, each row normalised on its own."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, hidden = x2.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows:
        chunk = min(NORM_CHUNK, triton.next_power_of_2(hidden))
        _rms_norm_kernel[(triton.cdiv(rows, NORM_ROWS),)](
            x2, weight, out, rows, x2.stride(0), out.stride(0), hidden, float(eps),
            ROWS=NORM_ROWS, CHUNK=chunk)
    return out.reshape(x.shape)
