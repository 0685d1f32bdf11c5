"""Run by tests/cluster/test_node_failure.py in its own process (it needs its own Ray
cluster of several nodes): an engine at tp=2 with one worker per node, a node removed
mid-generation (a spare takes over), then the last spare gone too (no capacity).

Prints one JSON object with what happened."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

from cluster.contract.config import EngineConfig
from cluster.contract.errors import EngineUnavailable
from cluster.engine.engine import Engine
from cluster.contract.sampling import SamplingParams
from tests.checkpoints import write_tiny_checkpoint

PROMPTS = [[(5 * i + 3 * j) % 150 + 1 for j in range(4 + i)] for i in range(12)]


def params(i: int) -> SamplingParams:
    if i % 3 == 2:
        return SamplingParams(max_tokens=48, temperature=0.8, seed=i, ignore_eos=True)
    return SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


def run_all(engine: Engine, during=None) -> dict[int, list[int]]:
    ids = [engine.add_request(prompt_token_ids=p, params=params(i)) for i, p in enumerate(PROMPTS)]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if during is not None and steps == 10:
            during()
    out = {}
    for i, request_id in enumerate(ids):
        result = engine.pop_finished(request_id).outputs[0]
        out[i] = {"tokens": result.token_ids, "finish": result.finish_reason, "error": result.error}
    return out


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]  # two for the workers, one spare
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    checkpoint = write_tiny_checkpoint("llama-gqa", Path(tempfile.mkdtemp()), seed=3)
    config = EngineConfig().with_overrides(dtype="float32", 
        model=str(checkpoint), tensor_parallel_size=2, cpus_per_worker=1.0,
        placement_strategy="STRICT_SPREAD", placement_timeout_s=4.0, recovery_timeout_s=10.0,
        restart_backoff_s=0.5, block_size=4, kv_cache_bytes=1 << 22, name="nodes")
    engine = Engine(config)
    report = {"backend": engine.group.backend}
    reference = run_all(engine)

    def node_of(rank: int):
        node_id = engine.group.ranks[rank].node_id
        return next(n for n in nodes if n.node_id == node_id)

    def remove_worker_node():
        victim, pid = node_of(1), engine.group.ranks[1].pid
        report.setdefault("removed", []).append(victim.node_id)
        cluster.remove_node(victim, allow_graceful=False)
        nodes.remove(victim)
        # its worker dies shortly after its raylet; wait for that, or fast steps could finish
        # every request first and the scenario would test nothing
        deadline = time.monotonic() + 30
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    after_node_loss = run_all(engine, during=remove_worker_node)
    report["restarts_after_node_loss"] = engine.supervisor.restarts
    report["identical_after_node_loss"] = after_node_loss == reference
    report["recovery"] = engine.supervisor.last_recovery
    report["nodes_after_recovery"] = sorted({r.node_id for r in engine.group.ranks})
    # now only two worker nodes are left; losing one more leaves no room for tp=2 spread
    started = time.monotonic()
    no_capacity = run_all(engine, during=remove_worker_node)
    report["fail_after_s"] = time.monotonic() - started
    report["no_capacity"] = no_capacity
    report["status"], report["reason"] = engine.status, engine.reason
    try:
        engine.add_request(prompt_token_ids=[1, 2, 3])
        report["admitted_while_failed"] = True
    except EngineUnavailable as exc:
        report["admitted_while_failed"] = False
        report["unavailable_message"] = str(exc)
    engine.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    watchdog = threading.Timer(400, lambda: (print("RESULT {\"hung\": true}"), sys.stdout.flush(),
                                             __import__("os")._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    main()
