"""The communicator interface, the rendezvous, and the one-rank group.

Every rank of a group must call the collectives in the same order with tensors of the same
shape and dtype (``gather``/``all_gather`` included: equal shapes). Groups are objects,
never module-level state; each is passed explicitly to the layers that use it (which see
it as ``layers.parallel.TensorParallelGroup``).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous, else a contiguous copy (see `copy_back`)."""
    return t if t.is_contiguous() else t.contiguous()


def copy_back(t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Finish an in-place op done on `buf = contiguous(t)`; returns `t`."""
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


# backends whose all-reduce adds the ranks' values in rank order, for every element and size
# (shm: each rank sums the slots 0, 1, ... in turn); with two ranks any order is that order
RANK_ORDERED = ("trivial", "shm")


class OrderedSum:
    """A communicator whose all-reduce adds the ranks' tensors in rank order, 0 first, on
    every rank, whatever the tensor's size (deterministic mode): the backend's own
    all-reduce (gloo's ring, NCCL's) splits a tensor into chunks by its size, so an element's
    sum order, and its rounding, would depend on how many rows the step has. Gathers every
    rank's tensor and adds them; everything else is the backend's."""

    def __init__(self, comm: Communicator):
        self._comm = comm

    def __getattr__(self, name: str):
        return getattr(self._comm, name)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._comm.all_gather(t.contiguous().unsqueeze(0))  # (world_size, *t.shape)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return copy_back(t, total)


def ordered_sums(comm: Communicator):
    """``comm`` where its all-reduce already sums in rank order, else it in an OrderedSum."""
    if isinstance(comm, OrderedSum) or comm.world_size <= 2 or comm.backend in RANK_ORDERED:
        return comm
    return OrderedSum(comm)
