"""RMSNorm, replicated on every rank."""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import load_whole, make_param
from layers.ops import NATIVE


class RMSNorm(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = make_param((hidden,), dtype, load_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), normalised in float32
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the next norm (one pass
        on platforms that fuse them)."""
        # x, residual: (tokens, hidden) -> both (tokens, hidden)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
