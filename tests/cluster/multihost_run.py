"""Run by tests/cluster/test_multihost.py inside the head "host" of a network-namespace
cluster (tests/netns.py): an engine at tp x pp (default 2 x 2) with STRICT_SPREAD, so every
rank runs on a host of its own and every all-reduce and every stage hand-off crosses the
hosts' interfaces over Gloo.

    ip netns exec shardlm-t-head .venv/bin/python -m tests.cluster.multihost_run ADDRESS [--tp 2 --pp 2]

1. greedy generations compared with transformers ``generate`` on the same checkpoint,
   computed here in one process (the independent reference);
2. where the ranks run (node IPs) and the GLOO_SOCKET_IFNAME each worker set;
3. a whole host lost mid-generation: after a few steps the script prints
   ``KILL <node ip>`` (the host of the last rank: last stage, TP rank tp-1) and waits for
   a line on stdin; whoever runs it (the test) kills every process in that host's
   namespace and answers ``KILLED``. The next step fails, the supervisor rebuilds the gang
   on the hosts left (a spare), and the requests finish with the same tokens.

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from cluster.contract.config import EngineConfig
from cluster.engine.engine import Engine
from cluster.contract.sampling import SamplingParams
from tests.checkpoints import write_tiny_checkpoint

PROMPTS = [[(11 * i + 5 * j) % 150 + 1 for j in range(n)] for i, n in enumerate([3, 9, 5, 14])]
MAX_TOKENS = 20
KILL_AT_STEP = 6  # prefill is step 1: the kill lands with every request half done


def reference(checkpoint: Path) -> list[list[int]]:
    """transformers' greedy continuations, one prompt at a time, in this process."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        gen = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def run_all(engine: Engine, during=None) -> list[list[int]]:
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    ids = [engine.add_request(prompt_token_ids=p, params=greedy) for p in PROMPTS]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if during is not None and steps == KILL_AT_STEP:
            during()
    outs = [engine.pop_finished(i).outputs[0] for i in ids]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    return [o.token_ids for o in outs]


def _socket_env(worker) -> dict:
    """What one worker process set for its collectives (runs inside the worker)."""
    import os

    import ray
    import psutil

    ip = ray.util.get_node_ip_address()
    ifaces = [n for n, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)]
    return {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME"),
            "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME"),
            "interface_of_node_ip": ifaces[0] if ifaces else None, "node_ip": ip,
            "interfaces": sorted(psutil.net_if_addrs())}


def describe(engine: Engine) -> list[dict]:
    envs = ray.get([w.__ray_call__.remote(_socket_env) for w in engine.group.workers], timeout=60)
    return [{"name": r.name, "pp_rank": r.pp_rank, "tp_rank": r.tp_rank, "ip": r.ip,
             "node_id": r.node_id, "pid": r.pid, "layers": getattr(r, "layers", None),
             "tp_backend": getattr(r, "tp_backend", None),
             "pp_backend": getattr(r, "pp_backend", None)} | env
            for r, env in zip(engine.group.ranks, envs, strict=True)]


def ask_to_kill(ip: str, report: dict) -> None:
    """Hand the kill to whoever runs this script; wait until it is done."""
    report["killed_ip"] = ip
    print(f"KILL {ip}", flush=True)
    answer = sys.stdin.readline().strip()
    report["kill_answer"] = answer
    if not answer.startswith("KILLED"):
        raise RuntimeError(f"expected KILLED on stdin, got {answer!r}")
    report["killed_at"] = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args()
    t0 = time.monotonic()
    ray.init(address=args.address, log_to_driver=False)
    timings = {"ray_init_s": time.monotonic() - t0}
    report: dict = {"timings": timings}
    directory = Path(tempfile.mkdtemp(prefix="shardlm-t-ckpt-"))  # /tmp: every host reads it
    engine = None
    try:
        # no eos: both sides generate exactly MAX_TOKENS, whatever the random weights pick
        checkpoint = write_tiny_checkpoint("llama-gqa", directory, seed=5, eos_token_id=None)
        t = time.monotonic()
        expected = reference(checkpoint)
        timings["reference_s"] = time.monotonic() - t
        config = EngineConfig().with_overrides(dtype="float32", 
            model=str(checkpoint), tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
            cpus_per_worker=1.0, placement_strategy="STRICT_SPREAD", placement_timeout_s=10.0,
            step_timeout_s=60.0, recovery_timeout_s=90.0, restart_backoff_s=1.0,
            block_size=4, kv_cache_bytes=4 << 20, name="multihost")
        t = time.monotonic()
        engine = Engine(config)
        timings["engine_start_s"] = time.monotonic() - t
        report["backend"] = engine.group.backend
        report["ranks"] = describe(engine)
        t = time.monotonic()
        first = run_all(engine)
        timings["generate_s"] = time.monotonic() - t
        report["matches_reference"] = first == expected
        report["outputs"], report["reference"] = first, expected

        victim = report["ranks"][-1]["ip"]  # the last stage's last TP rank
        t = time.monotonic()
        second = run_all(engine, during=lambda: ask_to_kill(victim, report))
        timings["generate_with_kill_s"] = time.monotonic() - t
        timings["kill_to_done_s"] = time.monotonic() - report.pop("killed_at")
        report["identical_after_kill"] = second == expected
        report["outputs_after_kill"] = second
        report["restarts"] = engine.supervisor.restarts
        report["recovery"] = engine.supervisor.last_recovery
        report["backend_after_recovery"] = engine.group.backend
        report["ranks_after_recovery"] = describe(engine)
    finally:
        if engine is not None:
            engine.shutdown()
        ray.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    timings["total_s"] = time.monotonic() - t0
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    watchdog = threading.Timer(float(os.environ.get("SHARDLM_SCENARIO_TIMEOUT_S", "240")),
                               lambda: (print('RESULT {"hung": true}', flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    main()
