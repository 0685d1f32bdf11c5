"""The platform, chosen once per worker: which implementation of the layers' ops it runs.

- ``cpu`` with float32 weights and the C kernels built, or bfloat16 or int8 weights
  (:mod:`layers.cpu`): :class:`CpuOps`, float32 activations in each case, the KV cache in
  bfloat16 where ``dtype`` is.
- ``cuda`` where triton imports (it comes with torch's CUDA wheels):
  :class:`layers.cuda.ops.CudaOps`, triton kernels over the paged KV cache.
- anything else (CPU float16, float32 with the kernels off with ``SHARDLM_CPU_KERNELS=0`` or no C
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


def cpu_dtype(flags: set[str] | None = None) -> str:
    """``model.dtype: auto`` on a CPU: bfloat16 where the CPU has native bf16 dot products
    (AVX512-BF16 or AMX-BF16), float32 elsewhere."""
    from layers.cpu.flags import BF16_DOT_FLAGS, cpu_flags  # CPU only: a GPU worker never loads layers.cpu

    return "bfloat16" if (cpu_flags() if flags is None else flags) & BF16_DOT_FLAGS else "float32"


def select_ops(device: torch.device | str, dtype: torch.dtype, quantization: str | None = None,
               deterministic: bool = False) -> TorchOps:
    """The platform for a worker on ``device`` with weights of ``dtype`` (``quantization``
    int8: CPU workers only). ``SHARDLM_OPS`` overrides the choice: ``torch`` (the reference)
    or ``triton`` (the CUDA kernels; on a CPU only under ``TRITON_INTERPRET=1``, how
    ``gpu-check --device cpu`` runs them). ``deterministic``: the CPU kernels and the triton
    kernels keep a row's sums in one order whatever else the step holds; torch's own
    kernels do not, and refuse it (ValueError naming the platform)."""
    ops = _select_ops(device, dtype, quantization, deterministic)
    if deterministic and not getattr(ops, "deterministic", False):
        raise ValueError(
            f"model.deterministic: the {ops.name} platform ({torch.device(device).type}, "
            f"{str(dtype).removeprefix('torch.')}) has no batch-invariant kernels: its matmuls "
            f"and attention sum in an order that depends on the step's other rows. It runs on "
            f"CPU workers with the C kernels (float32, bfloat16 or int8) and on CUDA workers "
            f"with triton")
    return ops


def _select_ops(device, dtype: torch.dtype, quantization: str | None, deterministic: bool
                ) -> TorchOps:
    forced = os.environ.get("SHARDLM_OPS", "")
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"SHARDLM_OPS={forced!r}: expected 'torch' or 'triton'")
    is_cpu = torch.device(device).type == "cpu"
    if quantization not in (None, "int8"):
        raise ValueError(f"quantization {quantization!r}: expected int8 or none")
    if quantization and not is_cpu:
        raise ValueError("quantization int8 runs on CPU workers only")
    if forced == "torch" and not quantization:
        return NATIVE
    if forced == "triton":
        from layers.cuda.ops import CudaOps

        return CudaOps(deterministic)
    if is_cpu and (quantization or dtype in (torch.float32, torch.bfloat16)):
        from layers.cpu.ops import CpuOps, kernels_available  # only CPU workers load it

        weights = quantization or {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        kv = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        if kernels_available() or weights != "float32":  # bf16 / int8 fall back op by op
            return CpuOps(weights=weights, kv_cache_dtype=kv, deterministic=deterministic)
    if torch.device(device).type == "cuda":
        try:
            from layers.cuda.ops import CudaOps  # only CUDA workers load triton
        except ImportError as exc:
            logging.getLogger(__name__).warning(
                "triton is not importable (%s): attention runs on torch's reference path, "
                "without CUDA graphs", exc)
            return NATIVE
        return CudaOps(deterministic)
    return NATIVE


def use_ops(model: nn.Module, ops: TorchOps) -> int:
    """Make ``ops`` the implementation of every layer of ``model`` (those with an ``ops``
    attribute), then let it prepare the weights; returns how many weights it rearranged."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return ops.prepare(model)
