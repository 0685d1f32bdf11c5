"""The platform, chosen once per worker: which implementation of the layers' ops it runs.

- ``cpu`` with float32 weights and the C kernels built (:mod:`layers.cpu`): :class:`CpuOps`.
- ``cuda`` where triton imports (it comes with torch's CUDA wheels):
  :class:`layers.cuda.ops.CudaOps`, triton kernels over the paged KV cache.
- anything else (CPU with other dtypes, kernels off with ``SHARDLM_CPU_KERNELS=0`` or no C
  compiler, CUDA without triton): the device-generic :class:`layers.ops.TorchOps`, torch's
  own kernels, with one log line saying why on CUDA.

:func:`use_ops` hands the choice to every layer of a model and lets it rearrange the
loaded weights (the CPU path packs them into panels).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from layers.ops import NATIVE, TorchOps


def select_ops(device: torch.device | str, dtype: torch.dtype) -> TorchOps:
    """The platform for a worker on ``device`` with weights of ``dtype``. ``SHARDLM_OPS``
    overrides the choice: ``torch`` (the reference) or ``triton`` (the CUDA kernels; on a
    CPU only under ``TRITON_INTERPRET=1``, how ``gpu-check --device cpu`` runs them)."""
    forced = os.environ.get("SHARDLM_OPS", "")
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"SHARDLM_OPS={forced!r}: expected 'torch' or 'triton'")
    if forced == "torch":
        return NATIVE
    if forced == "triton":
        from layers.cuda.ops import CudaOps

        return CudaOps()
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        from layers.cpu.ops import CpuOps, kernels_available  # only CPU workers load it

        if kernels_available():
            return CpuOps()
    if torch.device(device).type == "cuda":
        try:
            from layers.cuda.ops import CudaOps  # only CUDA workers load triton
        except ImportError as exc:
            logging.getLogger(__name__).warning(
                "triton is not importable (%s): attention runs on torch's reference path, "
                "without CUDA graphs", exc)
            return NATIVE
        return CudaOps()
    return NATIVE


def use_ops(model: nn.Module, ops: TorchOps) -> int:
    """Make ``ops`` the implementation of every layer of ``model`` (those with an ``ops``
    attribute), then let it prepare the weights; returns how many weights it rearranged."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return ops.prepare(model)
