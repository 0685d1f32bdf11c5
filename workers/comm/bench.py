"""All-reduce latency of the gloo and shm communicators between two Ray actors.

    python -m workers.comm.bench [--numel 576] [--iters 1000]

Starts a local Ray (2 CPUs), places two single-threaded actors on it, joins them
in a gloo group and then a shm group, and prints the median and p90 latency
of one all_reduce of `numel` float32 values, as seen by each rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import psutil
import ray
import torch

from workers.comm import Rendezvous, create_communicator, find_free_port


@ray.remote(num_cpus=0.5)
class BenchRank:
    """One rank: joins a group, times all-reduces."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.comm = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self, ip: str) -> int:
        return find_free_port(ip)

    def join(self, backend: str, rank: int, world_size: int, rdv: Rendezvous) -> None:
        ip = ray.util.get_node_ip_address()
        ifname = next((name for name, addrs in psutil.net_if_addrs().items()
                       if any(a.address == ip for a in addrs)), None)
        if ifname:  # Gloo must use the interface of the Ray node IP (docs/ARCHITECTURE.md)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        self.comm = create_communicator(backend, rank, world_size, rdv, timeout_s=60)

    def time_all_reduce(self, numel: int, iters: int, warmup: int = 100) -> list[float]:
        """Latencies in microseconds of `iters` all-reduces of (numel,) float32."""
        t = torch.ones(numel)  # (numel,)
        lat = []
        for i in range(warmup + iters):
            t.fill_(1.0)
            start = time.perf_counter_ns()
            self.comm.all_reduce(t)
            if i >= warmup:
                lat.append((time.perf_counter_ns() - start) / 1e3)
        assert bool((t == self.comm.world_size).all())
        self.comm.close()
        self.comm = None
        return lat


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def bench(backend: str, ranks: list, numel: int, iters: int) -> list[list[float]]:
    """Join `ranks` in a fresh `backend` group and time all-reduces on all of them."""
    ip = ray.get(ranks[0].node_ip.remote())
    rdv = Rendezvous(ip, ray.get(ranks[0].free_port.remote(ip)), f"bench-{uuid.uuid4().hex[:8]}")
    ray.get([a.join.remote(backend, r, len(ranks), rdv) for r, a in enumerate(ranks)])
    return ray.get([a.time_all_reduce.remote(numel, iters) for a in ranks])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=576)
    ap.add_argument("--iters", type=int, default=1000)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ranks = [BenchRank.remote() for _ in range(2)]
        print(f"all_reduce of {args.numel} float32, 2 ranks, {args.iters} iterations (us)")
        for backend in ("gloo", "shm"):
            for rank, lat in enumerate(bench(backend, ranks, args.numel, args.iters)):
                print(f"{backend:5s} rank {rank}: median {statistics.median(lat):8.1f}"
                      f"   p90 {_p(lat, 0.9):8.1f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
