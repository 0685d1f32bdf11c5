"""Communicators: the only way workers exchange tensors.

One interface (`Communicator`) with four implementations:

- ``gloo``: torch.distributed Gloo over TCP; CPU tensors, any nodes.
- ``shm``:  POSIX shared memory between ranks on one node; CPU tensors
  (see `workers.shm_comm`). Tens of microseconds for small all-reduces.
- ``nccl``: torch.distributed NCCL; CUDA tensors.
- trivial:  ``world_size == 1``; every op is a no-op or the identity.

Groups are objects, never module-level state: a process may hold several
communicators at once (a tensor-parallel group and a pipeline group, say), and
each is passed explicitly to the layers that use it.

Every rank of a group must call the collectives in the same order with tensors
of the same shape and dtype (``gather``/``all_gather`` included: equal shapes).
"""

from __future__ import annotations

import datetime
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cluster.config import BACKENDS


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one group meet.

    host: IP of the node hosting rank 0 (never 'localhost' across nodes).
    port: TCP port of rank 0's TCPStore, chosen at run time (`find_free_port`).
    group_id: unique name of the group (store key prefix, shm segment name).
    """

    host: str
    port: int
    group_id: str


def find_free_port(host: str = "0.0.0.0") -> int:
    """Return a TCP port that was free on `host` a moment ago (bind to port 0).

    The port is released before returning, so another process could take it
    in between; the rendezvous then fails loudly and the caller retries.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"backend 'nccl' needs device_type 'cuda', got {device_type!r}")
    return backend


class Communicator(ABC):
    """Collectives and point-to-point ops over one fixed group of ranks."""

    rank: int
    world_size: int
    backend: str

    @abstractmethod
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over all ranks, in place; returns `t`."""

    @abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's `t` (equal shapes) along `dim`, on all ranks."""

    @abstractmethod
    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        """Concatenate every rank's `t` along `dim` on rank `dst`; None elsewhere."""

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` with rank `src`'s `t`, in place; returns `t`."""

    @abstractmethod
    def send(self, t: torch.Tensor, dst: int) -> None:
        """Send `t` to rank `dst` (matched by a `recv` there)."""

    @abstractmethod
    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Receive from rank `src` into `t` (same shape/dtype as sent); returns `t`."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""

    @abstractmethod
    def close(self) -> None:
        """Release the group's resources; the communicator is unusable afterwards."""

    def _check_peer(self, peer: int, what: str) -> None:
        """Raise ValueError unless `peer` is a valid rank of this group."""
        if not 0 <= peer < self.world_size:
            raise ValueError(f"{what}={peer} is not a rank of a group of size {self.world_size}")

    def _check_other(self, peer: int, what: str) -> None:
        """Like `_check_peer`, and `peer` must not be this rank (point-to-point)."""
        self._check_peer(peer, what)
        if peer == self.rank:
            raise ValueError(f"{what}={peer} is this rank; point-to-point needs another rank")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous, else a contiguous copy (see `_copy_back`)."""
    return t if t.is_contiguous() else t.contiguous()


def _copy_back(t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Finish an in-place op done on `buf = _contiguous(t)`; returns `t`."""
    if buf is not t:
        t.copy_(buf)
    return t


class TrivialCommunicator(Communicator):
    """world_size == 1: reductions and gathers are the identity."""

    backend = "trivial"

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        self._check_peer(dst, "dst")
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_peer(src, "src")
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_other(dst, "dst")

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_other(src, "src")
        return t

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


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
        buf = _contiguous(t)
        self._pg.allreduce([buf]).wait()
        return _copy_back(t, buf)

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
        buf = _contiguous(t)
        self._pg.broadcast([buf], opts).wait()
        return _copy_back(t, buf)

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_other(dst, "dst")
        self._pg.send([t.contiguous()], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_other(src, "src")
        buf = _contiguous(t)
        self._pg.recv([buf], src, 0).wait()
        return _copy_back(t, buf)

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


def _make_store(rank: int, world_size: int, rdv: Rendezvous, timeout: datetime.timedelta):
    """TCPStore hosted by rank 0 at rdv.host:rdv.port, prefixed with the group id."""
    store = torch.distributed.TCPStore(
        rdv.host, rdv.port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    return torch.distributed.PrefixStore(f"shardlm/{rdv.group_id}/", store)


def _create_gloo(rank: int, world_size: int, rdv: Rendezvous, timeout_s: float) -> Communicator:
    """Gloo group. The interface comes from GLOO_SOCKET_IFNAME, which the caller
    sets (to the interface of its Ray node IP) before calling; Gloo's default
    device reads it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _make_store(rank, world_size, rdv, timeout)
    pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)
    return TorchDistCommunicator("gloo", pg, store, rank, world_size, torch.device("cpu"))


def _create_nccl(rank: int, world_size: int, rdv: Rendezvous, device: torch.device,
                 timeout_s: float) -> Communicator:
    """NCCL group on `device` (a cuda device; NCCL_SOCKET_IFNAME set by the caller)."""
    if device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a cuda device, got {device}")
    if not torch.distributed.is_nccl_available():
        raise RuntimeError("backend 'nccl' requested but this torch has no NCCL")
    if device.index is not None:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _make_store(rank, world_size, rdv, timeout)
    opts = torch.distributed.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    opts.group_name = rdv.group_id
    opts.global_ranks_in_group = list(range(world_size))
    pg = torch.distributed.ProcessGroupNCCL(store, rank, world_size, opts)
    return TorchDistCommunicator("nccl", pg, store, rank, world_size, device)


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
        return _create_gloo(rank, world_size, rendezvous, timeout_s)
    if backend == "nccl":
        return _create_nccl(rank, world_size, rendezvous, device, timeout_s)
    from workers.shm_comm import DEFAULT_SLOT_BYTES, ShmCommunicator
    return ShmCommunicator(rank, world_size, rendezvous.group_id, timeout_s,
                           shm_slot_bytes or DEFAULT_SLOT_BYTES)
