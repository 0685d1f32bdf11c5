"""Per-rank shard loading from safetensors checkpoints.

A rank never reads a whole tensor it only owns part of: every checkpoint
tensor is opened lazily (``safe_open(...).get_slice``) and each parameter's own
``weight_loader`` asks for exactly the rows or columns this rank owns.
Single-file checkpoints and sharded ones (``model.safetensors.index.json``)
are both read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


class TensorSource:
    """A lazy view of one checkpoint tensor; reads only the slices asked for."""

    def __init__(self, name: str, lazy_slice, stats: "LoadStats", first: int = 0):
        self.name = name
        self._slice = lazy_slice
        self._first = first  # this view's first row in the checkpoint tensor
        shape = tuple(lazy_slice.get_shape())
        self.shape = (shape[0] - first, *shape[1:])
        self._stats = stats

    def rows_from(self, first: int) -> "TensorSource":
        """The same tensor seen from row ``first`` on (one part of a packed tensor)."""
        return TensorSource(self.name, self._slice, self._stats, self._first + first)

    def read(self, dim: int, start: int, size: int) -> torch.Tensor:
        """Elements [start, start+size) along ``dim`` (0 or 1), everything along the other."""
        if start < 0 or start + size > self.shape[dim]:
            raise ValueError(f"{self.name}: slice [{start}, {start + size}) of dim {dim} is out of "
                             f"range for shape {self.shape}")
        first = self._first
        index = ((slice(first + start, first + start + size),) if dim == 0
                 else (slice(first, first + self.shape[0]), slice(start, start + size)))
        tensor = self._slice[index]
        self._stats.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


@dataclass
class LoadStats:
    bytes_read: int = 0  # bytes this rank copied out of the checkpoint
    checkpoint_bytes: int = 0  # size of every tensor file in the checkpoint
    tensors_used: int = 0
    loaded: set[tuple[str, str | None]] = field(default_factory=set)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or single)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {str(path)!r}")
    return files


def load_shard(model: nn.Module, path: str | Path) -> LoadStats:
    """Fill this rank's parameters of ``model`` from the checkpoint at ``path``.

    ``model.checkpoint_targets(name)`` says which parameters (and fused shard ids)
    a checkpoint tensor feeds on this rank; tensors that feed nothing are never read.
    """
    params = dict(model.named_parameters())
    stats = LoadStats()
    for file in checkpoint_files(path):
        stats.checkpoint_bytes += file.stat().st_size
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                targets = model.checkpoint_targets(name)
                if targets:
                    _load_tensor(handle, name, targets, params, stats)
    _check_complete(params, stats, path)
    return stats


def _load_tensor(handle, name: str, targets, params: dict[str, nn.Parameter], stats: LoadStats) -> None:
    source = TensorSource(name, handle.get_slice(name), stats)
    stats.tensors_used += 1
    for param_name, shard_id, *offset in targets:  # offset: the shard's first row in a
        param = params[param_name]  # tensor that packs several (Phi-3's qkv_proj)
        param.weight_loader(param, source.rows_from(offset[0]) if offset else source, shard_id)
        stats.loaded.add((param_name, shard_id))


def _check_complete(params: dict[str, nn.Parameter], stats: LoadStats, path) -> None:
    expected = {(name, shard) for name, p in params.items()
                for shard in getattr(p, "shard_ids", [None])}
    missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - stats.loaded)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks tensors for: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
