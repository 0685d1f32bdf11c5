"""NCCL through cupy's binding (``cupy.cuda.nccl``): every call is issued on torch's current
CUDA stream, so a decode step's collectives can be captured in a CUDA graph with the rest
of the step (``graph_safe``). torch.distributed's NCCL runs its collectives on streams of
its own, which a graph capture on torch's stream does not take in; it stays the fallback
where cupy is not installed (``pip install shardlm[gpu]``), with decode steps at tp > 1 then
run eagerly.

The group's NCCL id is made by rank 0 and handed to the others through the same TCPStore
rendezvous the torch.distributed groups use.
"""

from __future__ import annotations

import datetime

import torch

from workers.comm.base import Communicator, Rendezvous, contiguous, copy_back

# NCCL's ncclDataType_t values (nccl.h), for the dtypes the model's collectives carry
NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,
               torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}
NCCL_SUM = 0


def available() -> bool:
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception:  # not installed, or no CUDA/NCCL libraries behind it
        return False
    return True


def nccl_dtype(t: torch.Tensor) -> int:
    try:
        return NCCL_DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"NCCL carries no {t.dtype} tensors") from None


class CupyNcclCommunicator(Communicator):
    backend = "nccl"
    graph_safe = True

    def __init__(self, comm, store, rank: int, world_size: int, device: torch.device) -> None:
        self._comm, self._store = comm, store
        self.rank, self.world_size, self.device = rank, world_size, device

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = contiguous(t)
        self._comm.allReduce(buf.data_ptr(), buf.data_ptr(), buf.numel(), nccl_dtype(buf),
                             NCCL_SUM, self._stream())
        return copy_back(t, buf)

    def _gathered(self, t: torch.Tensor) -> torch.Tensor:
        # t: (...) -> (world, ...) every rank's t, rank-major
        t = t.contiguous()
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=t.device)
        self._comm.allGather(t.data_ptr(), out.data_ptr(), t.numel(), nccl_dtype(t),
                             self._stream())
        return out

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat(self._gathered(t).unbind(0), dim=dim)

    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        # NCCL has no gather: an all-gather whose result only dst keeps
        self._check_peer(dst, "dst")
        parts = self._gathered(t)
        return torch.cat(parts.unbind(0), dim=dim) if self.rank == dst else None

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_peer(src, "src")
        buf = contiguous(t)
        self._comm.broadcast(buf.data_ptr(), buf.data_ptr(), buf.numel(), nccl_dtype(buf), src,
                             self._stream())
        return copy_back(t, buf)

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_other(dst, "dst")
        t = t.contiguous()
        self._comm.send(t.data_ptr(), t.numel(), nccl_dtype(t), dst, self._stream())

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_other(src, "src")
        buf = contiguous(t)
        self._comm.recv(buf.data_ptr(), buf.numel(), nccl_dtype(buf), src, self._stream())
        return copy_back(t, buf)

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
        self._comm = self._store = None


def create_cupy_nccl(rank: int, world_size: int, rdv: Rendezvous, device: torch.device,
                     timeout_s: float) -> Communicator:
    from cupy.cuda import nccl

    from workers.comm.torch_dist import make_store

    if device.index is not None:
        torch.cuda.set_device(device)
    store = make_store(rank, world_size, rdv, datetime.timedelta(seconds=timeout_s))
    if rank == 0:
        store.set("nccl_unique_id", ",".join(map(str, nccl.get_unique_id())))
    unique_id = tuple(int(x) for x in store.get("nccl_unique_id").decode().split(","))
    with torch.cuda.device(device):
        comm = nccl.NcclCommunicator(world_size, unique_id, rank)
    return CupyNcclCommunicator(comm, store, rank, world_size, device)
