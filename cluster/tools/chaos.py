"""Fault injection for tests and operators (``shardlm chaos``).

- ``kill_worker``: SIGKILL a worker actor's process, found by its actor name,
  on whichever node it runs (a one-off task pinned to that node sends the signal).
- ``kill_engine``: SIGKILL the engine service actor's process (the driver); Ray restarts it
  and each request resumes from its caller's journal (``cluster.serving.stream``).
- ``hang_worker``: make a worker stall inside its next step, so its peers wait in
  a collective and the engine's step deadline has to catch it.
- Losing a whole node: ``ray.cluster_utils.Cluster.remove_node`` in tests, or stop
  the node (``ray stop`` on it) on a real cluster.
"""

from __future__ import annotations

import os
import signal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def worker_names(deployment: str = "shardlm", namespace: str = "shardlm", tp: int = 1,
                 pp: int = 1) -> list[str]:
    return [f"{deployment}-worker-{p}-{t}" for p in range(pp) for t in range(tp)]


def _where(name: str, namespace: str) -> dict:
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise ValueError(f"no worker actor named {name!r} in namespace {namespace!r}") from exc
    return ray.get(actor.address.remote(), timeout=60)


@ray.remote(num_cpus=0)
def _send_signal(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def kill_worker(name: str, namespace: str = "shardlm", sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` (default SIGKILL) to the worker's process; returns its pid."""
    where = _where(name, namespace)
    strategy = NodeAffinitySchedulingStrategy(where["node_id"], soft=False)
    ray.get(_send_signal.options(scheduling_strategy=strategy).remote(where["pid"], int(sig)))
    return where["pid"]


def kill_engine(deployment: str = "shardlm", namespace: str = "shardlm",
                sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` (default SIGKILL) to the engine service actor's process; returns its pid."""
    try:
        actor = ray.get_actor(deployment, namespace=namespace)
    except ValueError as exc:
        raise ValueError(f"no engine service named {deployment!r} in namespace {namespace!r}") from exc
    where = ray.get(actor.pid.remote(), timeout=60)
    strategy = NodeAffinitySchedulingStrategy(where["node_id"], soft=False)
    ray.get(_send_signal.options(scheduling_strategy=strategy).remote(where["pid"], int(sig)))
    return where["pid"]


def hang_worker(name: str, namespace: str = "shardlm", seconds: float = 3600.0) -> None:
    """Make the worker stall for ``seconds`` at the start of its next step."""
    actor = ray.get_actor(name, namespace=namespace)
    ray.get(actor.chaos_hang.remote(seconds), timeout=60)
