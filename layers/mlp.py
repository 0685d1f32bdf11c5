"""SwiGLU feed-forward block: merged gate/up (column-parallel), down (row-parallel)."""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import MergedColumnParallelLinear, RowParallelLinear
from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup


class SwiGLUMLP(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, comm: TensorParallelGroup,
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [("gate", intermediate), ("up", intermediate)], comm.world_size, comm.rank,
            bias, dtype)
        self.down_proj = RowParallelLinear.split(intermediate, hidden, comm.rank, bias, dtype, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden)
        return self.down_proj(self.ops.swiglu(self.gate_up_proj, x))  # via (tokens, intermediate_local)
