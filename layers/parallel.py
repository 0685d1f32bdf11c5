"""What the layers need of a tensor-parallel group: the interface the communicators of
``workers.comm`` implement. The layers receive a group object at construction and call
only these; they never create or look up a group themselves."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorParallelGroup(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the group's ranks (in place where possible)."""

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes) concatenated along ``dim``, on every rank."""

    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        """Every rank's ``t`` concatenated along ``dim`` on ``dst``; None on the others."""
