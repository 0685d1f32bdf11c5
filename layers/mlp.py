"""SwiGLU feed-forward block: merged gate/up (column-parallel), down (row-parallel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear import MergedColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:
    from workers.comm import Communicator


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, comm: "Communicator",
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [("gate", intermediate), ("up", intermediate)], comm.world_size, comm.rank,
            bias, dtype)
        self.down_proj = RowParallelLinear.split(intermediate, hidden, comm.rank, bias, dtype, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden)
        gate, up = self.gate_up_proj(x)  # each (tokens, intermediate_local)
        return self.down_proj(F.silu(gate) * up)
