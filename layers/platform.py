"""The platform, chosen once per worker: which implementation of the layers' ops it runs.

- ``cpu`` with float32 weights and the C kernels built (:mod:`layers.cpu`): :class:`CpuOps`.
- anything else (CUDA, other dtypes, kernels off with ``SHARDLM_CPU_KERNELS=0`` or no C
  compiler): the device-generic :class:`layers.ops.TorchOps`, torch's own kernels.

:func:`use_ops` hands the choice to every layer of a model and lets it rearrange the
loaded weights (the CPU path packs them into panels).
"""

from __future__ import annotations

import torch
from torch import nn

from layers.ops import NATIVE, TorchOps


def select_ops(device: torch.device | str, dtype: torch.dtype) -> TorchOps:
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        from layers.cpu.ops import CpuOps, kernels_available  # only CPU workers load it

        if kernels_available():
            return CpuOps()
    return NATIVE


def use_ops(model: nn.Module, ops: TorchOps) -> int:
    """Make ``ops`` the implementation of every layer of ``model`` (those with an ``ops``
    attribute), then let it prepare the weights; returns how many weights it rearranged."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return ops.prepare(model)
