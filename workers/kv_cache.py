"""This worker's slice of the paged KV cache.

Every worker holds the same number of blocks; a block holds, for each of this
rank's layers, the keys and values of ``block_size`` tokens for this rank's KV
heads. The driver's block manager decides which blocks a sequence uses.
"""

from __future__ import annotations

from contextlib import contextmanager

import psutil
import torch

from layers.attention import Attention
from workers.host_memory import HugePageArena


def attention_modules(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """KV bytes one block costs on this rank: 2 x layers x block_size x kv_heads x head_dim."""
    per_token = sum(2 * a.num_kv * a.head_dim for a in attention_modules(model))
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def blocks_that_fit(model: torch.nn.Module, block_size: int, dtype: torch.dtype,
                    budget: int) -> int:
    """How many blocks of this rank's KV fit in ``budget`` bytes."""
    return max(0, budget) // bytes_per_block(model, block_size, dtype)


def host_budget(fraction: float) -> int:
    """A CPU worker's KV budget: its share of the host memory free now."""
    return int(psutil.virtual_memory().available * fraction)


def gpu_budget(total: int, free: int, allocated: int, peak_allocated: int,
               utilization: float) -> int:
    """A GPU worker's KV budget, in bytes: of ``utilization`` x the GPU's ``total`` memory,
    what is left once everything in use now (``total - free``: the weights, the CUDA
    context, communicator buffers, other processes) and the activations' peak above it
    (``peak_allocated - allocated``, measured by a profiling forward pass) are counted.

    Raises ValueError, naming the figures, when nothing is left."""
    in_use = total - free
    activations = max(0, peak_allocated - allocated)
    budget = int(total * utilization) - in_use - activations
    if budget <= 0:
        gib = 1 << 30
        raise ValueError(
            f"cache.gpu_memory_utilization={utilization} allows {total * utilization / gib:.2f} "
            f"GiB of the GPU's {total / gib:.2f} GiB, but {in_use / gib:.2f} GiB are in use "
            f"(weights, CUDA context, other processes) and the activations of a full step "
            f"peak at {activations / gib:.2f} GiB more: nothing is left for the KV cache; "
            "raise gpu_memory_utilization, lower scheduler.max_num_batched_tokens, or add GPUs")
    return budget


def allocate(model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
             device: torch.device) -> int:
    """Give every attention layer its cache tensor; returns the bytes allocated. On a CPU
    the caches live on huge pages (``workers.host_memory.HugePageArena``) and are touched
    here, so that the memory is taken now rather than when the blocks fill."""
    total = 0
    arena = HugePageArena() if device.type == "cpu" else None
    for attn in attention_modules(model):
        shape = (2, num_blocks, block_size, attn.num_kv, attn.head_dim)  # local KV heads
        attn.ops.check_block_size(block_size)
        if arena is None:
            attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        else:
            attn.kv_cache = arena.zeros(shape, dtype).zero_()
        total += attn.kv_cache.numel() * attn.kv_cache.element_size()
    return total


@contextmanager
def set_aside(model: torch.nn.Module):
    """Within the block the attention layers see no KV cache (a whole-sequence forward on a
    worker whose cache is allocated); the caches come back untouched after it."""
    layers = attention_modules(model)
    caches = [a.kv_cache for a in layers]
    for attn in layers:
        attn.kv_cache = None
    try:
        yield
    finally:
        for attn, cache in zip(layers, caches):
            attn.kv_cache = cache


def release(model: torch.nn.Module) -> None:
    for attn in attention_modules(model):
        attn.kv_cache = None
