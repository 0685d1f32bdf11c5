"""Communicators across real processes (spawn), for the gloo and shm backends.

Four long-lived worker processes (each imports torch once) run the ranks of
every group; each rank checks its results against references it computes
itself from the seeds of every rank, and returns plain Python values.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import time
import traceback
import uuid

import pytest
import torch

from workers.comm import (Rendezvous, TrivialCommunicator, create_communicator,
                          find_free_port, ordered_sums, resolve_backend)
from workers.comm.shm_segment import segment_path as _segment_path

MAX_WS = 4
SMALL_SLOT = 1024  # bytes: 256 fp32 per chunk, 128-byte mailbox chunks
RESULT_TIMEOUT_S = 60


# ---- helpers that run in the worker processes ------------------------------------

def _data(rank: int, n: int, salt: int, dtype=torch.float32) -> torch.Tensor:
    """Rank `rank`'s deterministic input: any rank can recompute any other's."""
    g = torch.Generator().manual_seed(10_000 * salt + rank)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def _check_all_reduce(comm, ws: int) -> dict:
    """Consecutive all-reduces of many sizes/dtypes, chunked ones included.

    With SMALL_SLOT, every case but n in (0, 1, 37) spans several chunks.
    """
    out = {}
    cases = [(576, torch.float32), (1, torch.float32), (10_000, torch.float32),
             (37, torch.float64), (576, torch.float32), (3000, torch.int64),
             (4096, torch.bfloat16), (0, torch.float32), (70_000, torch.float32)]
    for i, (n, dtype) in enumerate(cases):
        t = _data(comm.rank, n, i, dtype)
        ret = comm.all_reduce(t)
        ref = sum(_data(r, n, i, dtype).double() for r in range(ws))
        tol = 0.1 if dtype == torch.bfloat16 else 1e-5
        out[f"ar{i}_n{n}"] = ret is t and torch.allclose(t.double(), ref, atol=tol, rtol=tol)
        if i in (2, 8):  # both the small (numpy) and the large (torch) shm path
            out[f"digest{i}"] = hashlib.sha1(t.numpy().tobytes()).hexdigest()
    x = torch.arange(12.0).view(3, 4).t() + comm.rank  # non-contiguous (4, 3)
    comm.all_reduce(x)
    out["noncontig"] = torch.equal(x, (torch.arange(12.0).view(3, 4).t() * ws + sum(range(ws))))
    return out


def _check_gathers(comm, ws: int) -> dict:
    mine = lambda r: torch.arange(6.0).view(2, 3) + 100 * r  # (2, 3)
    every = [mine(r) for r in range(ws)]
    out = {"ag0": torch.equal(comm.all_gather(mine(comm.rank)), torch.cat(every, 0)),
           "ag1": torch.equal(comm.all_gather(mine(comm.rank), dim=1), torch.cat(every, 1))}
    big = [_data(r, 3000, 77) for r in range(ws)]  # > slot: chunked
    out["ag_big"] = torch.equal(comm.all_gather(big[comm.rank]), torch.cat(big))
    dst = ws - 1
    got = comm.gather(mine(comm.rank), dst=dst, dim=1)
    out["gather"] = torch.equal(got, torch.cat(every, 1)) if comm.rank == dst else got is None
    src = 1 % ws
    t = _data(comm.rank, 1000, 5)
    out["bcast"] = comm.broadcast(t, src=src) is t and torch.equal(t, _data(src, 1000, 5))
    return out


def _check_p2p(comm, ws: int) -> dict:
    """Ring exchange (even ranks send first), small and chunked messages."""
    r, nxt, prv = comm.rank, (comm.rank + 1) % ws, (comm.rank - 1) % ws
    out = {}
    for i, shape in enumerate([(5,), (30, 100)]):
        mine = _data(r, int(torch.tensor(shape).prod()), 40 + i).view(shape)
        want = _data(prv, mine.numel(), 40 + i).view(shape)
        got = torch.empty(shape)
        if r % 2 == 0:
            comm.send(mine, nxt)
            comm.recv(got, prv)
        else:
            comm.recv(got, prv)
            comm.send(mine, nxt)
        out[f"ring{i}"] = torch.equal(got, want)
    if r == 0:  # two sends in a row before the peer receives
        comm.send(torch.full((3,), 1.0), 1)
        comm.send(torch.full((3,), 2.0), 1)
    elif r == 1:
        a, b = comm.recv(torch.empty(3), 0), comm.recv(torch.empty(3), 0)
        out["ordered"] = a.tolist() == [1.0] * 3 and b.tolist() == [2.0] * 3
    return out


def _check_ordered_sums(comm, ws: int) -> dict:
    """Deterministic mode's all-reduce (``ordered_sums``): every element the ranks' values
    added in rank order, 0 first, at every size (values of very different magnitudes, so
    that another order would round differently)."""
    ordered = ordered_sums(comm)
    out = {}
    for i, n in enumerate((3, 576, 70_000)):
        parts = [_data(r, n, 50 + i) * 10.0 ** (4 * (r % 3)) for r in range(ws)]
        want = parts[0].clone()
        for part in parts[1:]:
            want += part
        out[f"ordered_n{n}"] = torch.equal(ordered.all_reduce(parts[comm.rank].clone()), want)
    return out


def _check_barrier(comm, ws: int, tmpdir: str) -> dict:
    """Side effects before the barrier are visible to every rank after it."""
    ok = True
    for round_ in range(3):
        open(os.path.join(tmpdir, f"{round_}-{comm.rank}"), "w").close()
        comm.barrier()
        ok &= all(os.path.exists(os.path.join(tmpdir, f"{round_}-{q}")) for q in range(ws))
    return {"barrier": ok}


def _suite(backend, rank, ws, rdv, tmpdir, held):
    comm = create_communicator(backend, rank, ws, rdv, timeout_s=30,
                               shm_slot_bytes=SMALL_SLOT)
    try:
        out = {}
        out.update(_check_all_reduce(comm, ws))
        out.update(_check_gathers(comm, ws))
        out.update(_check_ordered_sums(comm, ws))
        out.update(_check_p2p(comm, ws))
        out.update(_check_barrier(comm, ws, tmpdir))
        return out
    finally:
        comm.close()


def _join_and_hold(backend, rank, ws, rdv, timeout_s, held):
    """Join the group and keep the communicator without calling any collective."""
    held[rdv.group_id] = create_communicator(backend, rank, ws, rdv, timeout_s=timeout_s,
                                             shm_slot_bytes=SMALL_SLOT)
    return "joined"


def _release(rdv, held):
    held.pop(rdv.group_id).close()
    return "released"


def _reduce_expecting_failure(backend, rank, ws, rdv, op_timeout_s, held):
    """Join, then all_reduce while the peer does not take part; report the error.

    Joining uses a generous timeout (the peer may be a fresh, slow process); the
    op itself uses op_timeout_s.
    """
    comm = create_communicator(backend, rank, ws, rdv, timeout_s=RESULT_TIMEOUT_S,
                               shm_slot_bytes=SMALL_SLOT)
    comm.timeout_s = op_timeout_s
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(576))
        return {"error": None}
    except (TimeoutError, RuntimeError) as e:
        return {"error": type(e).__name__, "msg": str(e), "elapsed": time.monotonic() - start}
    finally:
        comm.close()


SCENARIOS = {f.__name__: f for f in (_suite, _join_and_hold, _release, _reduce_expecting_failure)}


def _worker_main(tasks, results) -> None:
    """Worker process loop: run scenarios by name until told to stop."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rendezvous is on 127.0.0.1
    held: dict = {}
    while (task := tasks.get()) is not None:
        run_id, rank, name, kwargs = task
        try:
            results.put((run_id, rank, True, SCENARIOS[name](held=held, **kwargs)))
        except BaseException:
            results.put((run_id, rank, False, traceback.format_exc()))


def _die_after_join(rdv) -> None:
    torch.set_num_threads(1)
    create_communicator("shm", 1, 2, rdv, timeout_s=30, shm_slot_bytes=SMALL_SLOT)
    os._exit(0)


# ---- parent side -------------------------------------------------------------------

class _Pool:
    """MAX_WS worker processes; worker r plays rank r of each group."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.stash: dict[str, dict[int, tuple]] = {}  # results of other runs, by run id
        self.tasks = [self.ctx.Queue() for _ in range(MAX_WS)]
        self.procs = [self.ctx.Process(target=_worker_main, args=(q, self.results), daemon=True)
                      for q in self.tasks]
        for p in self.procs:
            p.start()

    def submit(self, ranks_kwargs: dict[int, dict], name: str) -> str:
        run_id = uuid.uuid4().hex
        for rank, kwargs in ranks_kwargs.items():
            self.tasks[rank].put((run_id, rank, name, kwargs))
        return run_id

    def collect(self, run_id: str, n: int) -> dict[int, object]:
        """Wait for n results of run `run_id`; fail the test on an error or timeout."""
        got, deadline = self.stash.pop(run_id, {}), time.monotonic() + RESULT_TIMEOUT_S
        while len(got) < n:
            try:
                rid, rank, ok, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"run {run_id}: {n - len(got)} rank(s) gave no result in time")
            self.stash.setdefault(rid, {})[rank] = (ok, value)
            got.update(self.stash.pop(run_id, {}))
        for rank, (ok, value) in got.items():
            if not ok:
                pytest.fail(f"rank {rank} failed:\n{value}")
        return {rank: value for rank, (ok, value) in got.items()}

    def run(self, name: str, n_ranks: int, /, **common) -> dict[int, object]:
        """Run scenario `name` as ranks 0..n_ranks-1 with the same kwargs."""
        tasks = {r: dict(rank=r, **common) for r in range(n_ranks)}
        return self.collect(self.submit(tasks, name), n_ranks)

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def pool():
    p = _Pool()
    yield p
    p.close()


def _rdv() -> Rendezvous:
    return Rendezvous("127.0.0.1", find_free_port("127.0.0.1"), f"test-{uuid.uuid4().hex[:12]}")


@pytest.mark.parametrize("ws", [2, 3, 4])
@pytest.mark.parametrize("backend", ["gloo", "shm"])
def test_collectives_and_p2p(pool, backend, ws, tmp_path):
    results = pool.run("_suite", ws, backend=backend, ws=ws, rdv=_rdv(), tmpdir=str(tmp_path))
    digests = {(checks.pop("digest2"), checks.pop("digest8")) for checks in results.values()}
    for rank, checks in results.items():
        assert all(checks.values()), f"rank {rank}: failed {[k for k, v in checks.items() if not v]}"
    assert len(digests) == 1, "all_reduce results differ bitwise between ranks"


def test_shm_segment_name_removed(pool, tmp_path):
    rdv = _rdv()
    pool.run("_suite", 2, backend="shm", ws=2, rdv=rdv, tmpdir=str(tmp_path))
    shm_dir = os.path.dirname(_segment_path(rdv.group_id))
    assert not [f for f in os.listdir(shm_dir) if rdv.group_id in f]


def test_shm_peer_not_participating_times_out(pool):
    rdv = _rdv()
    holder = pool.submit({1: dict(backend="shm", rank=1, ws=2, rdv=rdv, timeout_s=30.0)},
                         "_join_and_hold")
    run_id = pool.submit({0: dict(backend="shm", rank=0, ws=2, rdv=rdv, op_timeout_s=1.0)},
                         "_reduce_expecting_failure")
    res = pool.collect(run_id, 1)[0]
    pool.collect(holder, 1)
    pool.collect(pool.submit({1: dict(rdv=rdv)}, "_release"), 1)
    assert res["error"] == "TimeoutError", res
    assert rdv.group_id in res["msg"] and "[1]" in res["msg"] and "timed out" in res["msg"]
    assert res["elapsed"] >= 1.0  # it waited for its own deadline (op_timeout_s), no less


def test_shm_dead_peer_raises(pool):
    rdv = _rdv()
    run_id = pool.submit({0: dict(backend="shm", rank=0, ws=2, rdv=rdv, op_timeout_s=3.0)},
                         "_reduce_expecting_failure")
    dying = mp.get_context("spawn").Process(target=_die_after_join, args=(rdv,))
    dying.start()
    dying.join(RESULT_TIMEOUT_S)  # reaped: rank 0 can see that pid 1 is gone
    res = pool.collect(run_id, 1)[0]
    assert res["error"] in ("RuntimeError", "TimeoutError"), res
    assert rdv.group_id in res["msg"] and "1" in res["msg"]


def test_shm_absent_peer_times_out_at_join():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 0"):
        create_communicator("shm", 1, 2, _rdv(), timeout_s=0.5)
    assert time.monotonic() - t0 >= 0.5  # it gave rank 0 its whole timeout


def test_resolve_backend_rules():
    assert resolve_backend("auto", "cuda", True) == "nccl"
    assert resolve_backend("auto", "cuda", False) == "nccl"
    assert resolve_backend("auto", "cpu", True) == "shm"
    assert resolve_backend("auto", "cpu", False) == "gloo"
    assert resolve_backend("gloo", "cpu", True) == "gloo"
    assert resolve_backend("shm", "cpu", True) == "shm"
    assert resolve_backend("nccl", "cuda", False) == "nccl"
    with pytest.raises(ValueError, match="'mpi'"):
        resolve_backend("mpi", "cpu", True)
    with pytest.raises(ValueError, match="shm"):
        resolve_backend("shm", "cpu", False)
    with pytest.raises(ValueError, match="nccl"):
        resolve_backend("nccl", "cpu", True)
    for cpu_only in ("shm", "gloo"):  # their collectives carry CPU tensors
        with pytest.raises(ValueError, match=f"backend '{cpu_only}' carries CPU tensors"):
            resolve_backend(cpu_only, "cuda", True)


def test_bad_backend_name_in_create():
    with pytest.raises(ValueError, match="'carrier-pigeon'"):
        create_communicator("carrier-pigeon", 0, 2, _rdv())
    with pytest.raises(ValueError, match="'auto'"):
        create_communicator("auto", 0, 2, _rdv())


def test_world_size_one_is_trivial():
    comm = create_communicator("shm", 0, 1, _rdv())
    assert isinstance(comm, TrivialCommunicator)
    t = torch.arange(4.0)
    assert comm.all_reduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert torch.equal(comm.all_gather(t), t) and torch.equal(comm.gather(t), t)
    assert comm.broadcast(t) is t
    comm.barrier()
    with pytest.raises(ValueError):
        comm.send(t, 0)
    comm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="nccl needs at least two CUDA devices (visible with SHARDLM_TEST_GPU=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nccl_collectives_two_gpus(dtype):
    """Every collective the model uses, in fp32 and bf16, through the NCCL communicator the
    worker gets (cupy's where installed, else torch.distributed's)."""
    rdv, ctx = _rdv(), mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, rdv, results, dtype)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == {0: [], 1: []}, got


def _nccl_rank(rank, rdv, results, dtype) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dev = torch.device("cuda", rank)
    comm = create_communicator("nccl", rank, 2, rdv, device=dev, timeout_s=60)
    failed = []

    def check(name, got, expected):
        if got != expected:
            failed.append((name, got, expected))

    t = torch.full((576,), float(rank + 1), device=dev, dtype=dtype)
    check("all_reduce", comm.all_reduce(t).unique().tolist(), [3.0])
    check("all_gather", comm.all_gather(torch.full((2,), float(rank), device=dev, dtype=dtype)
                                        ).tolist(), [0.0, 0.0, 1.0, 1.0])
    g = comm.gather(torch.full((1, 2), float(rank), device=dev, dtype=dtype), dst=0, dim=1)
    check("gather", None if g is None else g.tolist(), [[0.0, 0.0, 1.0, 1.0]] if rank == 0 else None)
    x = torch.full((3,), float(rank), device=dev, dtype=dtype)
    check("broadcast", comm.broadcast(x, src=1).tolist(), [1.0] * 3)
    if rank == 0:
        comm.send(torch.arange(4.0, device=dev, dtype=dtype), 1)
    else:
        check("recv", comm.recv(torch.empty(4, device=dev, dtype=dtype), 0).tolist(),
              [0.0, 1.0, 2.0, 3.0])
    comm.barrier()
    comm.close()
    results.put((rank, failed))
