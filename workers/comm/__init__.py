"""Communicators: the only way workers exchange tensors.

One interface (`Communicator`) with four implementations:

- ``gloo``: torch.distributed Gloo over TCP; CPU tensors, any nodes.
- ``shm``:  POSIX shared memory between ranks on one node; CPU tensors
  (see `workers.comm.shm`). Tens of microseconds for small all-reduces.
- ``nccl``: NCCL for CUDA tensors: through cupy where it is installed (calls on torch's
  current stream, so CUDA graphs can hold them; `workers.comm.cupy_nccl`), else
  torch.distributed's NCCL.
- trivial:  ``world_size == 1``; every op is a no-op or the identity.

Groups are objects, never module-level state: a process may hold several
communicators at once (a tensor-parallel group and a pipeline group, say), and
each is passed explicitly to the layers that use it.

Every rank of a group must call the collectives in the same order with tensors
of the same shape and dtype (``gather``/``all_gather`` included: equal shapes).
"""

from __future__ import annotations

import torch

from cluster.contract.config import BACKENDS
from workers.comm.base import (Communicator, Rendezvous, TrivialCommunicator, find_free_port,
                               ordered_sums)

__all__ = ["Communicator", "Rendezvous", "TrivialCommunicator", "create_communicator", "ordered_sums",
           "find_free_port", "resolve_backend"]


def resolve_backend(backend: str, device_type: str, same_node: bool) -> str:
    """Turn a configured backend name (possibly "auto") into a concrete one.

    "auto" picks nccl on cuda, shm when all ranks share a node, gloo otherwise.
    Raises ValueError for unknown names and impossible combinations.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown communication backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device_type == "cuda":
            return "nccl"
        return "shm" if same_node else "gloo"
    if backend == "shm" and not same_node:
        raise ValueError("backend 'shm' needs every rank on the same node (same_node=False)")
    if backend in ("shm", "gloo") and device_type != "cpu":
        raise ValueError(f"backend {backend!r} carries CPU tensors; device_type {device_type!r} "
                         "needs 'nccl' (or 'auto')")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"backend 'nccl' needs device_type 'cuda', got {device_type!r}")
    return backend


def create_communicator(backend: str, rank: int, world_size: int, rendezvous: Rendezvous,
                        device: torch.device | str = "cpu", timeout_s: float = 300.0,
                        *, shm_slot_bytes: int | None = None) -> Communicator:
    """Join group `rendezvous.group_id` as `rank` of `world_size`.

    backend: "gloo", "shm" or "nccl" (already resolved, see `resolve_backend`).
    Every rank calls this collectively; it returns once the group is usable.
    timeout_s bounds the rendezvous and every later wait.
    shm_slot_bytes: per-rank buffer size of the shm backend (bigger tensors
    are processed in chunks); None keeps its default.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if backend not in ("gloo", "shm", "nccl"):
        raise ValueError(f"unknown or unresolved communication backend {backend!r}")
    device = torch.device(device)
    if world_size == 1:
        return TrivialCommunicator()
    if backend == "gloo":
        from workers.comm.torch_dist import create_gloo

        return create_gloo(rank, world_size, rendezvous, timeout_s)
    if backend == "nccl":
        from workers.comm import cupy_nccl

        if device.type == "cuda" and cupy_nccl.available():
            return cupy_nccl.create_cupy_nccl(rank, world_size, rendezvous, device, timeout_s)
        from workers.comm.torch_dist import create_nccl

        return create_nccl(rank, world_size, rendezvous, device, timeout_s)
    from workers.comm.shm import DEFAULT_SLOT_BYTES, ShmCommunicator
    return ShmCommunicator(rank, world_size, rendezvous.group_id, timeout_s,
                           shm_slot_bytes or DEFAULT_SLOT_BYTES)
