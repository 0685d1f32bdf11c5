"""Tensor-parallel linear layers (Megatron style).

Each parameter carries a ``weight_loader(param, source, shard_id)`` that copies
only this rank's slice out of a checkpoint tensor; ``source`` is a lazy slice
reader (see ``workers.loader.TensorSource``): ``source.read(dim, start, size)``.
Only RowParallelLinear talks to the communicator (one all-reduce).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup
from layers.partition import split_range, split_sizes


_param_zeros: Callable = torch.zeros  # (shape, dtype=) -> zero-filled tensor; see param_memory


@contextmanager
def param_memory(zeros: Callable):
    """Within the block, parameters made by ``make_param`` take their memory from
    ``zeros(shape, dtype=dtype)`` (a CPU worker: ``workers.host_memory.HugePageArena``)."""
    global _param_zeros
    previous, _param_zeros = _param_zeros, zeros
    try:
        yield
    finally:
        _param_zeros = previous


def make_param(shape: tuple[int, ...], dtype: torch.dtype, loader: Callable) -> nn.Parameter:
    param = nn.Parameter(_param_zeros(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


def load_rows(param: nn.Parameter, source, start: int, size: int, offset: int = 0) -> None:
    """Copy rows [start, start+size) of the checkpoint tensor into param[offset:offset+size]."""
    param.data[offset:offset + size].copy_(source.read(0, start, size))


def load_whole(param: nn.Parameter, source, shard_id=None) -> None:
    if tuple(source.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor {source.name} has shape {tuple(source.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(source.read(0, 0, source.shape[0]))


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows owned].T: output features split over ranks, no communication.

    ``shards`` lists (shard_id, start, size) blocks of output rows: one block for a
    plain layer, several for fused layers (q/k/v, gate/up) stacked in that order.
    """

    packable = True  # the CPU path may repack the weight (layers.cpu.ops.CpuOps.prepare)
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, in_features: int, shards: list[tuple[str | None, int, int]],
                 bias: bool, dtype: torch.dtype):
        super().__init__()
        self.offsets = {}
        offset = 0
        for shard_id, start, size in shards:
            self.offsets[shard_id] = (offset, start, size)
            offset += size
        self.out_local = offset
        self.weight = make_param((offset, in_features), dtype, self._load)
        self.bias = make_param((offset,), dtype, self._load) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.shard_ids = list(self.offsets)  # the loader checks each one arrives

    def _load(self, param: nn.Parameter, source, shard_id: str | None = None) -> None:
        offset, start, size = self.offsets[shard_id]
        load_rows(param, source, start, size, offset)

    def project(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # x: (tokens, in_features) -> (tokens, out_local), fused blocks side by side (of
        # ``out_dtype`` where given)
        return self.ops.linear(x, self.weight, self.bias, out_dtype)

    forward = project

    @classmethod
    def split(cls, in_features: int, out_features: int, tp_size: int, tp_rank: int,
              bias: bool, dtype: torch.dtype) -> "ColumnParallelLinear":
        start, size = split_range(out_features, tp_size, tp_rank)
        return cls(in_features, [(None, start, size)], bias, dtype)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection for this rank's heads (see layers.partition.head_shard)."""

    def __init__(self, hidden: int, head_dim: int, shard, bias: bool, dtype: torch.dtype):
        blocks = [("q", shard.q_start * head_dim, shard.num_q * head_dim),
                  ("k", shard.kv_start * head_dim, shard.num_kv * head_dim),
                  ("v", shard.kv_start * head_dim, shard.num_kv * head_dim)]
        super().__init__(hidden, blocks, bias, dtype)
        self.q_size = shard.num_q * head_dim
        self.kv_size = shard.num_kv * head_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.project(x)  # (tokens, q_size + 2 * kv_size)
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input, each split the same way."""

    def __init__(self, in_features: int, names_and_sizes: list[tuple[str, int]], tp_size: int,
                 tp_rank: int, bias: bool, dtype: torch.dtype):
        blocks = [(name, *split_range(size, tp_size, tp_rank)) for name, size in names_and_sizes]
        super().__init__(in_features, blocks, bias, dtype)
        self.local_sizes = [size for _, _, size in blocks]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.project(x).split(self.local_sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W[:, cols owned].T) + b: input features split over ranks.

    With ``gather_inputs`` (deterministic mode, tp > 1) the layer computes what tp = 1 does
    instead: every rank gathers the whole input, multiplies it by its share of the output
    features (W[rows owned], all columns) and the outputs are gathered. Each output is then
    one dot product over all the input features, in the kernel's one order, on whichever
    rank and at whatever tp: no partial sums whose split (and so rounding) depends on the
    tensor-parallel degree."""

    packable = True  # the CPU path may repack the weight (layers.cpu.ops.CpuOps.prepare)
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, splits: list[tuple[int, int]], out_features: int, bias: bool,
                 dtype: torch.dtype, comm: TensorParallelGroup):
        """``splits``: every rank's (start, size) of the input features, in rank order; this
        rank holds ``splits[comm.rank]``'s columns (all of them with ``gather_inputs``)."""
        super().__init__()
        if len(splits) != comm.world_size:
            raise ValueError(f"RowParallelLinear: {len(splits)} input splits for "
                             f"{comm.world_size} ranks")
        self.in_start, self.in_size = splits[comm.rank]
        self.comm = comm
        self.splits = splits
        self.gathers = False  # set by gather_inputs
        self.out_sizes: list[int] = []
        self.weight = make_param((out_features, self.in_size), dtype, self._load_weight)
        self.bias = make_param((out_features,), dtype, load_whole) if bias else None

    def _load_weight(self, param: nn.Parameter, source, shard_id=None) -> None:
        if self.gathers:  # this rank's output rows, every input column
            start = sum(self.out_sizes[:self.comm.rank])
            param.data.copy_(source.read(0, start, self.out_sizes[self.comm.rank]))
            return
        param.data.copy_(source.read(1, self.in_start, self.in_size))

    def gather_inputs(self) -> bool:
        """Switch to gathering the input (see the class), before the weights are loaded;
        False (nothing changed) on a single rank."""
        ws = self.comm.world_size
        if ws == 1:
            return False
        out, dtype = self.weight.shape[0], self.weight.dtype
        self.out_sizes = output_shares(out, ws)
        in_features = sum(size for _, size in self.splits)
        self.weight = make_param((self.out_sizes[self.comm.rank], in_features), dtype,
                                 self._load_weight)
        self.gathers = True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, in_size) -> (tokens, out_features), summed over ranks
        if self.gathers:
            whole = gather_columns(self.comm, x, [size for _, size in self.splits])
            y = gather_columns(self.comm, self.ops.linear(whole, self.weight), self.out_sizes)
        else:
            y = self.comm.all_reduce(self.partial(x))
        return y if self.bias is None else y + self.bias

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before the sum over ranks (no bias).
        x: (tokens, in_size) -> (tokens, out_features)"""
        if self.gathers:
            raise RuntimeError("RowParallelLinear: a layer that gathers its inputs has no partial sum")
        return self.ops.linear(x, self.weight)

    @classmethod
    def split(cls, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
              comm: TensorParallelGroup) -> "RowParallelLinear":
        """``in_features`` split evenly over the group's ranks (earlier ranks larger)."""
        splits = [split_range(in_features, comm.world_size, r) for r in range(comm.world_size)]
        return cls(splits, out_features, bias, dtype, comm)


OUT_GRANULE = 32  # gathered layers' output features per rank: whole panels of the widest kernel


def output_shares(out_features: int, world_size: int) -> list[int]:
    """Each rank's number of output features of a layer that gathers its inputs: whole
    panels of OUT_GRANULE where there are enough, else single features."""
    whole_panels = out_features % OUT_GRANULE == 0 and out_features >= OUT_GRANULE * world_size
    unit = OUT_GRANULE if whole_panels else 1
    return [n * unit for n in split_sizes(out_features // unit, world_size)]


def gather_columns(comm: TensorParallelGroup, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's columns of a (tokens, sizes[rank]) tensor side by side, in rank order, on
    every rank -> (tokens, sum(sizes)). Unequal widths travel padded to the widest."""
    width = max(sizes)
    if t.shape[1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
    parts = comm.all_gather(t.contiguous().unsqueeze(0), dim=0)  # (world, tokens, width)
    if all(n == width for n in sizes):
        return parts.permute(1, 0, 2).reshape(t.shape[0], -1)
    return torch.cat([parts[r, :, :n] for r, n in enumerate(sizes)], dim=1)
