"""The CPU path's weight formats: int8 quantization, oneDNN's blocked bf16 copy and its GEMM,
and copies padded to whole panels."""

from __future__ import annotations

import torch


def pad_rows(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """``weight`` (out, in) with zero rows appended up to a multiple of ``multiple`` outputs
    (itself where it has that already): a copy the panel kernels take, its extra outputs
    cut from their results."""
    pad = -weight.shape[0] % multiple
    return weight if not pad else torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])


def onednn_blocked(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's own blocked layout of a bf16 weight (the tiles AMX or AVX512-BF16 read): its
    GEMM on that copy ran 1.3-2x faster here than on the (out, in) matrix, which it
    re-blocks on every call. None where this torch has no oneDNN linear."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)  # 64: the rows it is tuned for
    except (AttributeError, RuntimeError):
        return None


def bf16_gemm(x: torch.Tensor, weight: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    # x: (rows, in) float32 or bf16; weight: (out, in) bf16, blocked: its oneDNN copy
    # -> (rows, out) bf16 (float32 sums rounded once)
    if blocked is not None:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), blocked, None, "none", [], "")
    return torch.nn.functional.linear(x.to(torch.bfloat16), weight)


def quantize_int8(weight: torch.Tensor, rows_per_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-feature int8: each row's largest magnitude maps to 127. Done in
    chunks of rows, so that the float32 temporaries stay small (the worker's allocator keeps
    freed memory: a whole-matrix temporary would stay resident).

    weight: (out, in) -> (int8 (out, in), float32 scales (out,)); weight ~ q * scales[:, None]"""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], rows_per_chunk):
        w = weight[start:start + rows_per_chunk].float()
        step = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q[start:start + rows_per_chunk] = torch.round(w / step[:, None]).clamp_(-127, 127)
        scales[start:start + rows_per_chunk] = step
    return q, scales
