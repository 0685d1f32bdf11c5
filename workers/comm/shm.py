"""Shared-memory communicator for ranks on one node (CPU tensors).

Segment layout (one file in /dev/shm, mapped by every rank; int64 words):

    line 0                 magic, version, world_size, slot_bytes, mailbox_bytes
    line 1 + r             rank r: step counter, pid, pid-namespace inode
    pair lines             per ordered pair (src, dst), src != dst:
                           sender line [sent, nbytes of buffer 0, nbytes of buffer 1],
                           receiver line [acked]
    collective slots       2 buffers x world_size slots x slot_bytes
    mailboxes              per ordered pair: 2 buffers x mailbox_bytes

Each control line is 64 bytes (one cache line, one writer) to avoid false sharing.

Collectives. Every collective is a sequence of *steps* (one per chunk of at most
slot_bytes per rank; a barrier is one empty step). At step k (counted locally,
identical on every rank because all ranks call the same collectives in the same
order) a rank writes its chunk into slot [k % 2][rank], publishes step counter
k + 1, waits until every rank's counter is >= k + 1, then reads what it needs.
Double buffering makes this single wait enough: a rank overwrites buffer k % 2
again only at step k + 2, after seeing every counter reach k + 2, which each rank
publishes only once it has finished reading step k.

Point-to-point. Each ordered pair (src, dst) has a mailbox with two buffers and
two counters: `sent` (written by src) and `acked` (written by dst). Message n
goes into buffer n % 2 once acked >= n - 1; so up to two chunks are in flight
and a send does not wait for its recv unless the mailbox is full.

Waiting spins briefly, then calls sched_yield, then sleeps in short naps, so that
several ranks on a few shared cores do not starve one another. Every wait has a
deadline and checks periodically whether the awaited peer's process still exists;
a dead or absent peer raises instead of hanging.

Memory ordering: data is copied before the counter store and read after the
counter load, both in program order. That is sufficient on x86-64 (TSO); weaker
architectures would need explicit fences.

Rank 0 creates the segment (under a temporary name, renamed when initialised),
other ranks attach; once all have attached, rank 0 unlinks the name, so a crash
never leaves a segment behind.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from workers.comm.base import Communicator, contiguous, copy_back
from workers.comm.shm_segment import Layout, attach_segment, create_segment, pid_namespace, segment_path

DEFAULT_SLOT_BYTES = 32 << 20  # per rank and per buffer of the collective slots
SPIN_ITERS = 2000  # pure spinning before yielding (~100 us of Python)
YIELD_S = 2e-3  # then sched_yield for this long
NAP_S = 50e-6  # then sleep in naps of this length
LIVENESS_PERIOD_S = 0.25  # how often a waiting rank checks that its peer exists
NUMPY_MAX_BYTES = 256 << 10  # all-reduce chunks up to this size use numpy (lower overhead)


class ShmCommunicator(Communicator):
    """Collectives through a shared-memory segment; see the module docstring.

    `timeout_s` bounds joining and every later wait; it is a plain attribute, so
    a caller may join with a generous timeout and then tighten it for steps.
    """

    backend = "shm"

    def __init__(self, rank: int, world_size: int, group_id: str, timeout_s: float = 300.0,
                 slot_bytes: int = DEFAULT_SLOT_BYTES) -> None:
        if slot_bytes < 64:
            raise ValueError(f"shm slot_bytes must be >= 64, got {slot_bytes}")
        self.rank, self.world_size, self.group_id = rank, world_size, group_id
        self.timeout_s = timeout_s
        self._lay = Layout(world_size, slot_bytes // 64 * 64)
        self._path = segment_path(group_id)
        self._step = 0  # collective steps done (identical on all ranks)
        self._sent = [0] * world_size  # messages sent to each rank
        self._recvd = [0] * world_size  # messages received from each rank
        self._views: dict[torch.dtype, torch.Tensor] = {}
        self._np_views: dict[torch.dtype, np.ndarray | None] = {}
        self._pidns = pid_namespace()
        if rank == 0:
            self._mm = create_segment(self._path, self._lay)
        else:
            self._mm = attach_segment(self._path, self._lay, rank, group_id, timeout_s)
        self._buf = memoryview(self._mm)
        self._words = self._buf[: self._lay.header_bytes].cast("q")
        self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)  # (total_bytes,)
        self._announce()

    # ---- setup -----------------------------------------------------------------

    def _announce(self) -> None:
        """Publish pid, then (rank 0) wait for every rank and unlink the name."""
        w, lay = self._words, self._lay
        w[lay.pid_word(self.rank) + 1] = self._pidns
        w[lay.pid_word(self.rank)] = os.getpid()
        if self.rank != 0:
            return
        try:
            for r in range(1, self.world_size):
                self._wait(lay.pid_word(r), 1, [r], "attach", check_alive=False)
        finally:
            self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def _slots(self, dtype: torch.dtype) -> torch.Tensor:
        """(2, world_size, slot_elems) view of the collective slots as `dtype`."""
        v = self._views.get(dtype)
        if v is None:
            lay = self._lay
            raw = self._bytes[lay.coll_offset: lay.mailbox_offset]
            v = raw.view(dtype).view(2, self.world_size, -1)
            self._views[dtype] = v
        return v

    def _np_slots(self, dtype: torch.dtype) -> np.ndarray | None:
        """The same slots as a numpy array, or None for dtypes numpy lacks (bf16).

        A numpy op costs well under a microsecond against several for a torch
        op, which is most of the latency of a small all-reduce.
        """
        if dtype not in self._np_views:
            try:
                self._np_views[dtype] = self._slots(dtype).numpy()
            except TypeError:
                self._np_views[dtype] = None
        return self._np_views[dtype]

    # ---- waiting ---------------------------------------------------------------

    def _wait(self, word: int, target: int, peers: list[int], what: str,
              check_alive: bool = True) -> None:
        """Block until words[word] >= target; raise on timeout or a dead peer."""
        words = self._words
        for _ in range(SPIN_ITERS):
            if words[word] >= target:
                return
        start = time.monotonic()
        next_check = start + LIVENESS_PERIOD_S
        while words[word] < target:
            now = time.monotonic()
            if now - start < YIELD_S:
                os.sched_yield()
            else:
                time.sleep(NAP_S)
            if now >= next_check:
                next_check = now + LIVENESS_PERIOD_S
                if check_alive:
                    self._check_alive(peers, what)
                if now - start > self.timeout_s:
                    raise TimeoutError(
                        f"shm group {self.group_id!r}: rank {self.rank} timed out after "
                        f"{self.timeout_s}s in {what} waiting for rank(s) {peers}")

    def _check_alive(self, peers: list[int], what: str) -> None:
        """Raise RuntimeError if a peer's process no longer exists (same pid namespace)."""
        for r in peers:
            pid, ns = self._words[self._lay.pid_word(r)], self._words[self._lay.pid_word(r) + 1]
            if pid <= 0 or ns != self._pidns or ns == 0:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(
                    f"shm group {self.group_id!r}: rank {self.rank} in {what}: peer rank {r} "
                    f"(pid {pid}) has died") from None
            except PermissionError:
                pass

    def _sync_step(self, what: str) -> int:
        """Finish one collective step: publish arrival, wait for all ranks.

        Returns the buffer index (0/1) the step used.
        """
        buf, self._step = self._step & 1, self._step + 1
        lay, words, target = self._lay, self._words, self._step
        words[lay.step_word(self.rank)] = target
        for r in range(self.world_size):
            if r != self.rank and words[lay.step_word(r)] < target:
                late = [p for p in range(self.world_size)
                        if words[lay.step_word(p)] < target]
                self._wait(lay.step_word(r), target, late, f"{what} (step {target})")
        return buf

    def _chunks(self, n: int, dtype):
        """(start, stop) element ranges of at most one slot; one empty range if n == 0.

        dtype: a torch or numpy dtype (both have .itemsize).
        """
        per = self._lay.slot_bytes // dtype.itemsize
        return [(s, min(s + per, n)) for s in range(0, n, per)] or [(0, 0)]

    # ---- collectives -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._mm is None:
            raise RuntimeError(f"shm group {self.group_id!r}: communicator is closed")

    def _check_cpu(self, t: torch.Tensor) -> None:
        """Every op with a tensor starts here: the group open, `t` on the CPU."""
        self._check_open()
        if not t.is_cpu:
            raise ValueError(f"shm communicator needs CPU tensors, got {t.device}")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._check_cpu(t)
        buf = contiguous(t)
        flat = buf.detach().view(-1)  # (n,)
        np_slots = self._np_slots(t.dtype)
        small = flat.numel() * t.dtype.itemsize <= NUMPY_MAX_BYTES
        if np_slots is not None and small:
            self._all_reduce_chunks(flat.numpy(), np_slots, np.add.reduce)
        else:
            self._all_reduce_chunks(flat, self._slots(t.dtype), torch.sum)
        return copy_back(t, buf)

    def _all_reduce_chunks(self, flat, slots, sum_fn) -> None:
        """flat: (n,) tensor or ndarray, reduced in place; slots: (2, ws, slot_elems)
        of the same kind; sum_fn: torch.sum or np.add.reduce (same call shape here).
        """
        for a, b in self._chunks(len(flat), slots.dtype):
            mine = flat[a:b]
            slots[self._step & 1, self.rank, : b - a] = mine
            used = self._sync_step("all_reduce")
            # same summation order on every rank -> bitwise identical results
            sum_fn(slots[used, :, : b - a], 0, out=mine)

    def _gather_into(self, t: torch.Tensor, want: bool, what: str) -> torch.Tensor | None:
        """Every rank contributes t; returns (ws, n) of all ranks' t where `want`."""
        self._check_cpu(t)
        flat = t.contiguous().view(-1)  # (n,)
        out = torch.empty((self.world_size, flat.numel()), dtype=t.dtype) if want else None
        slots = self._slots(t.dtype)  # (2, ws, slot_elems)
        for a, b in self._chunks(flat.numel(), t.dtype):
            slots[self._step & 1, self.rank, : b - a].copy_(flat[a:b])
            used = self._sync_step(what)
            if want:
                out[:, a:b].copy_(slots[used, :, : b - a])
        return out

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        out = self._gather_into(t, True, "all_gather")  # (ws, n)
        return torch.cat(out.view(self.world_size, *t.shape).unbind(0), dim=dim)

    def gather(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        self._check_peer(dst, "dst")
        out = self._gather_into(t, self.rank == dst, "gather")  # (ws, n) on dst
        if out is None:
            return None
        return torch.cat(out.view(self.world_size, *t.shape).unbind(0), dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_peer(src, "src")
        self._check_cpu(t)
        buf = contiguous(t)
        flat = buf.view(-1)  # (n,)
        slots = self._slots(t.dtype)
        for a, b in self._chunks(flat.numel(), t.dtype):
            if self.rank == src:
                slots[self._step & 1, src, : b - a].copy_(flat[a:b])
            used = self._sync_step("broadcast")
            if self.rank != src:
                flat[a:b].copy_(slots[used, src, : b - a])
        return copy_back(t, buf)

    def barrier(self) -> None:
        self._check_open()
        self._sync_step("barrier")

    # ---- point-to-point --------------------------------------------------------

    def _byte_chunks(self, nbytes: int):
        per = self._lay.mailbox_bytes
        return [(s, min(s + per, nbytes)) for s in range(0, nbytes, per)] or [(0, 0)]

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._check_other(dst, "dst")
        self._check_cpu(t)
        data = t.contiguous().view(-1).view(torch.uint8)  # (nbytes,)
        lay, words = self._lay, self._words
        pair = lay.pair(self.rank, dst)
        for a, b in self._byte_chunks(data.numel()):
            n = self._sent[dst]
            if words[lay.acked_word(pair)] < n - 1:  # both buffers still unread
                self._wait(lay.acked_word(pair), n - 1, [dst], f"send to rank {dst}")
            off = lay.mailbox(pair, n & 1)
            self._bytes[off: off + b - a].copy_(data[a:b])
            words[lay.sent_word(pair) + 1 + (n & 1)] = b - a
            words[lay.sent_word(pair)] = n + 1
            self._sent[dst] = n + 1

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._check_other(src, "src")
        self._check_cpu(t)
        buf = contiguous(t)
        data = buf.view(-1).view(torch.uint8)  # (nbytes,)
        lay, words = self._lay, self._words
        pair = lay.pair(src, self.rank)
        for a, b in self._byte_chunks(data.numel()):
            n = self._recvd[src]
            if words[lay.sent_word(pair)] < n + 1:
                self._wait(lay.sent_word(pair), n + 1, [src], f"recv from rank {src}")
            got = words[lay.sent_word(pair) + 1 + (n & 1)]
            if got != b - a:
                raise RuntimeError(
                    f"shm group {self.group_id!r}: rank {self.rank} expected a chunk of "
                    f"{b - a} bytes from rank {src}, got {got} (shape/dtype mismatch)")
            off = lay.mailbox(pair, n & 1)
            data[a:b].copy_(self._bytes[off: off + b - a])
            words[lay.acked_word(pair)] = n + 1
            self._recvd[src] = n + 1
        return copy_back(t, buf)

    # ---- teardown --------------------------------------------------------------

    def close(self) -> None:
        """Unmap the segment (rank 0 also removes its name if still there)."""
        if self._mm is None:
            return
        if self.rank == 0:
            self._unlink()
        self._views.clear()
        self._np_views.clear()
        self._bytes = None
        self._words.release()
        self._buf.release()
        self._words = self._buf = None
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere: let GC unmap it
            pass
        self._mm = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
