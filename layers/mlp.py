"""Gated feed-forward block: merged gate/up (column-parallel), down (row-parallel);
``act(gate) * up`` with SiLU (SwiGLU: Llama, Qwen, Phi) or tanh-approximated GELU (GeGLU:
Gemma)."""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import MergedColumnParallelLinear, RowParallelLinear
from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup

ACTIVATIONS = ("silu", "gelu_tanh")


class GatedMLP(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, comm: TensorParallelGroup,
                 bias: bool = False, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; supported: {ACTIVATIONS}")
        self.activation = activation
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [("gate", intermediate), ("up", intermediate)], comm.world_size, comm.rank,
            bias, dtype)
        self.down_proj = RowParallelLinear.split(intermediate, hidden, bias, dtype, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), via (tokens, intermediate_local)
        return self.down_proj(self.gated(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before the sum over ranks (a block that adds
        several shares and sums them once: Mixture-of-Experts' shared expert).
        x: (tokens, hidden) -> (tokens, hidden)"""
        return self.down_proj.partial(self.gated(x))

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> act(gate) * up (tokens, intermediate_local)
        if self.activation == "silu":
            return self.ops.swiglu(self.gate_up_proj, x)
        return self.ops.gelu_tanh_mul(self.gate_up_proj.project(x))

