"""RMSNorm, replicated on every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers import cpu_kernels
from layers.linear import load_whole, make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = make_param((hidden,), dtype, load_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden); normalised in float32 like the reference implementation
        if x.dtype == torch.float32 == self.weight.dtype:  # one fused op, same arithmetic
            out = cpu_kernels.rms_norm(x, self.weight, self.eps)
            return out if out is not None else F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the next norm in one pass
        where the C kernel applies."""
        # x, residual: (tokens, hidden) -> both (tokens, hidden)
        fused = cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
        if fused is not None:
            return fused
        total = x + residual
        return self(total), total
