"""RMSNorm, replicated on every rank."""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import load_whole, make_param
from layers.ops import NATIVE


class RMSNorm(nn.Module):
    """``plus_one``: the checkpoint stores ``w`` and the norm scales by ``1 + w`` (Gemma);
    ``1 + w`` is what the parameter holds once loaded."""

    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = make_param((hidden,), dtype, _load_plus_one if plus_one else load_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), normalised in float32
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the next norm (one pass
        on platforms that fuse them)."""
        # x, residual: (tokens, hidden) -> both (tokens, hidden)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def _load_plus_one(param: nn.Parameter, source, shard_id=None) -> None:
    load_whole(param, source)
    param.data.copy_(param.data.float() + 1.0)  # 1 + w computed in float32, as Gemma does
