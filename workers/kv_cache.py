"""This worker's slice of the paged KV cache.

Every worker holds the same number of blocks; a block holds, for each of this
rank's layers, the keys and values of ``block_size`` tokens for this rank's KV
heads. The driver's block manager decides which blocks a sequence uses.
"""

from __future__ import annotations

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


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def blocks_that_fit(model: torch.nn.Module, block_size: int, dtype: torch.dtype,
                    device: torch.device, cache_bytes: int | None, fraction: float) -> int:
    """How many blocks this rank can hold: a fixed byte budget, or a share of free memory."""
    budget = cache_bytes if cache_bytes is not None else int(available_bytes(device) * fraction)
    return budget // bytes_per_block(model, block_size, dtype)


def allocate(model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
             device: torch.device) -> int:
    """Give every attention layer its cache tensor; returns the bytes allocated. On a CPU
    the caches live on huge pages (``workers.host_memory.HugePageArena``) and are touched
    here, so that the memory is taken now rather than when the blocks fill."""
    total = 0
    arena = HugePageArena() if device.type == "cpu" else None
    for attn in attention_modules(model):
        shape = (2, num_blocks, block_size, attn.num_kv, attn.head_dim)  # local KV heads
        if arena is None:
            attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        else:
            attn.kv_cache = arena.zeros(shape, dtype).zero_()
        total += attn.kv_cache.numel() * attn.kv_cache.element_size()
    return total


def release(model: torch.nn.Module) -> None:
    for attn in attention_modules(model):
        attn.kv_cache = None
