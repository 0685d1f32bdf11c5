"""torch.distributed process groups as communicators: Gloo (CPU tensors, any nodes) and
NCCL (CUDA tensors), rendezvous through a TCPStore hosted by rank 0."""

from __future__ import annotations

import datetime

import torch

from workers.comm.base import Communicator, Rendezvous, contiguous, copy_back


class TorchDistCommunicator(Communicator):
    """A torch.distributed backend object (ProcessGroupGloo / ProcessGroupNCCL).

    The backend is constructed directly on a TCPStore rather than through
    `init_process_group`, so no global default group exists and one process
    can hold several groups.
    """

    def __init__(self, backend: str, pg, store, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.device = device
        self._pg = pg
        self._store = store  # rank 0 hosts the store: keep it alive with the group

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = contiguous(t)
        self._pg.allreduce([buf]).wait()
        return copy_back(t, buf)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._pg.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=dim)

    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        self._check_peer(dst, "dst")
        t = t.contiguous()
        opts = torch.distributed.GatherOptions()
        opts.rootRank = dst
        is_dst = self.rank == dst
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if is_dst else []
        self._pg.gather([parts] if is_dst else [], [t], opts).wait()
        return torch.cat(parts, dim=dim) if is_dst else None

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_peer(src, "src")
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        buf = contiguous(t)
        self._pg.broadcast([buf], opts).wait()
        return copy_back(t, buf)

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_other(dst, "dst")
        self._pg.send([t.contiguous()], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_other(src, "src")
        buf = contiguous(t)
        self._pg.recv([buf], src, 0).wait()
        return copy_back(t, buf)

    def barrier(self) -> None:
        if self.backend == "nccl":
            # NCCL's barrier guesses a device; a 1-element all-reduce does not.
            self.all_reduce(torch.zeros(1, device=self.device))
            torch.cuda.synchronize(self.device)
        else:
            self._pg.barrier().wait()

    def close(self) -> None:
        if self._pg is not None and hasattr(self._pg, "shutdown"):
            self._pg.shutdown()
        self._pg = self._store = None


def make_store(rank: int, world_size: int, rdv: Rendezvous, timeout: datetime.timedelta):
    """TCPStore hosted by rank 0 at rdv.host:rdv.port, prefixed with the group id."""
    store = torch.distributed.TCPStore(
        rdv.host, rdv.port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    return torch.distributed.PrefixStore(f"shardlm/{rdv.group_id}/", store)


def create_gloo(rank: int, world_size: int, rdv: Rendezvous, timeout_s: float) -> Communicator:
    """Gloo group. The interface comes from GLOO_SOCKET_IFNAME, which the caller
    sets (to the interface of its Ray node IP) before calling; Gloo's default
    device reads it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = make_store(rank, world_size, rdv, timeout)
    pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)
    return TorchDistCommunicator("gloo", pg, store, rank, world_size, torch.device("cpu"))


def create_nccl(rank: int, world_size: int, rdv: Rendezvous, device: torch.device,
                 timeout_s: float) -> Communicator:
    """NCCL group on `device` (a cuda device; NCCL_SOCKET_IFNAME set by the caller)."""
    if device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a cuda device, got {device}")
    if not torch.distributed.is_nccl_available():
        raise RuntimeError("backend 'nccl' requested but this torch has no NCCL")
    if device.index is not None:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = make_store(rank, world_size, rdv, timeout)
    opts = torch.distributed.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    opts.group_name = rdv.group_id
    opts.global_ranks_in_group = list(range(world_size))
    pg = torch.distributed.ProcessGroupNCCL(store, rank, world_size, opts)
    return TorchDistCommunicator("nccl", pg, store, rank, world_size, device)
