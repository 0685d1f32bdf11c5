"""SwiGLU feed-forward block: merged gate/up (column-parallel), down (row-parallel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from layers import cpu_kernels
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
        gate_up = self.gate_up_proj.project(x)  # (tokens, 2 * intermediate_local)
        act = cpu_kernels.silu_mul(gate_up)  # (tokens, intermediate_local)
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.down_proj(act)
