"""Losing the head node: Ray's GCS fault tolerance with a real Redis, the API replicas and the
engine service on a worker node (``deployment.resources``), as k8s/ sets them up.

Hosts in network namespaces (tests/netns.py): ``head`` (the Ray head: GCS, Serve's
controller, a Serve proxy; no CPUs), ``w1`` (a Ray worker node advertising the custom
resource the config asks for: the API replica, the engine service, the worker actor, a Serve
proxy) and ``ext`` (no Ray node: the Redis server the GCS keeps its tables in, and the HTTP
client). The scenario:

1. a streamed completion through ``w1``'s proxy, for reference;
2. the same stream again, and after its first tokens the GCS is killed (SIGKILL), then
   every other process of the head (a head pod's container ends so: ``ray start --block``
   ends the head once its GCS is gone). The stream goes on from ``w1`` with no head at all
   and ends with every token, the reference's text; a new request sent meanwhile is
   answered too;
3. the head starts again (``ray start --head``, the same Redis and storage namespace: what
   KubeRay does when it restarts the head pod); the GCS reloads its tables from Redis, ``w1``
   reconnects as the same node, Serve's controller comes back on the new head and takes
   over the running replica, and requests are answered through both proxies, while the API
   replica and the engine service were never restarted (same actor, same incarnation).

Needs root and ``ip netns`` (skipped without them, saying why) and the dev extra's
redis-server (`make install`)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from tests import netns
from tests.checkpoints import write_tiny_checkpoint, write_word_tokenizer
from tests.cluster.head_failure_run import PORT, PROMPT, RESOURCE
from tests.services import redis_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
REDIS_PORT = 6379
REDIS_PASSWORD = "shardlm-test-" + uuid.uuid4().hex[:8]
MAX_TOKENS = 600  # long enough to outlast the head's going down
SHORT = 24  # the other requests: the reference's first tokens (greedy)
KILL_AFTER_TOKENS = 8
HEAD, W1, EXT = (netns.PREFIX + name for name in ("head", "w1", "ext"))


def _run(cluster, ns: str, *args: str, timeout: float = 240) -> dict:
    """A head_failure_run command inside host ``ns``; its RESULT."""
    proc = cluster.run_in(ns, [sys.executable, "-m", "tests.cluster.head_failure_run", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{args[0]} in {ns}: no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _start_stream(cluster, url: str, model: str,
                  max_tokens: int = MAX_TOKENS) -> tuple[subprocess.Popen, queue.Queue]:
    argv = [sys.executable, "-m", "tests.cluster.head_failure_run", "stream", url, model,
            str(max_tokens)]
    with open(netns.RUN_DIR / "client.log", "a") as log:
        proc = cluster.popen_in(EXT, argv, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=log, stdin=subprocess.DEVNULL)
    return proc, netns.stdout_lines(proc)


def _finish_stream(proc: subprocess.Popen, lines: queue.Queue, arrivals: list[float]) -> dict:
    """The client's RESULT; ``arrivals`` gets each chunk's arrival time."""
    result = None
    while (line := lines.get(timeout=120)) is not None:
        if line.startswith("TOKENS "):
            arrivals.append(float(line.split()[2]))
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    proc.wait(timeout=30)
    assert result is not None, f"the client gave no result:\n{_client_log()}"
    return result


def _client_log() -> str:
    return (netns.RUN_DIR / "client.log").read_text(errors="replace")[-3000:]


def _stream(cluster, url: str, model: str, max_tokens: int = MAX_TOKENS) -> dict:
    proc, lines = _start_stream(cluster, url, model, max_tokens)
    return _finish_stream(proc, lines, [])


def _lose_the_head(cluster) -> dict:
    """SIGKILL the head's GCS, then every other process of the head host (as when a KubeRay
    head pod's container ends: `ray start --block` ends the head once its GCS is gone).
    Times on CLOCK_MONOTONIC."""
    (gcs,) = cluster.pids_named(HEAD, "gcs_server")
    killed_at = time.monotonic()
    os.kill(gcs, signal.SIGKILL)
    others = cluster.kill_node(HEAD)
    return {"gcs_killed_at": killed_at, "head_gone_at": time.monotonic(),
            "other_head_processes_killed": others}


def _wait_healed(cluster, before: dict, timeout: float = 150) -> dict:
    """Ray's own tables once healed: the old head dead, a new head alive, the Serve
    application running again."""
    old_head = next(n["id"] for n in before["nodes"] if n["ip"] == cluster.hosts[HEAD].ip)
    return _run(cluster, W1, "healed", cluster.address, old_head, cluster.hosts[HEAD].ip,
                str(timeout), timeout=timeout + 60)


def _transformers_greedy(checkpoint: Path) -> list[int]:
    """transformers' greedy continuation of the prompt, SHORT tokens, not stopping at EOS."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # the requests set ignore_eos
    prompt = torch.tensor([PROMPT])
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SHORT,
                         do_sample=False, pad_token_id=0)
    return gen[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = netns.unavailable_reason()
    if reason:
        print(f"skipping the head failure test: {reason}")
        pytest.skip(reason)
    checkpoint = tmp_path_factory.mktemp("headloss")
    write_tiny_checkpoint("llama-gqa", checkpoint, seed=11, max_position_embeddings=1024)
    write_word_tokenizer(checkpoint)
    model = str(checkpoint)
    storage = f"shardlm-test-{uuid.uuid4().hex}"  # RAY_external_storage_namespace
    out: dict = {"timings": {}, "transformers": _transformers_greedy(checkpoint)}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:

        def start_redis(cluster) -> None:  # in ext, before the head: its GCS needs it
            ext = cluster.hosts[EXT]
            stack.enter_context(redis_server(ext.temp_dir, REDIS_PORT, bind=ext.ip,
                                             password=REDIS_PASSWORD,
                                             popen=partial(cluster.popen_in, EXT)))
            cluster.head_env |= {"RAY_REDIS_ADDRESS": f"{ext.ip}:{REDIS_PORT}",
                                 "RAY_external_storage_namespace": storage}
            out["redis"] = (ext.ip, REDIS_PORT)

        # KubeRay gives the workers this (the head keeps Ray's 60 s)
        cluster = stack.enter_context(netns.netns_ray_cluster(
            workers=("w1",), others=("ext",), num_cpus=2,
            env={"RAY_gcs_rpc_server_reconnect_timeout_s": "600"},
            head_args=["--redis-password", REDIS_PASSWORD], worker_resources={RESOURCE: 1},
            before_start=start_redis))
        t = out["timings"]
        t["cluster_up_s"] = time.monotonic() - started
        w1_url = f"http://{cluster.hosts[W1].ip}:{PORT}/v1"
        head_url = f"http://{cluster.hosts[HEAD].ip}:{PORT}/v1"
        out["hosts"] = {ns: h.ip for ns, h in cluster.hosts.items()}
        out["before"] = _run(cluster, W1, "deploy", cluster.address, model)
        t["deployed_s"] = time.monotonic() - started
        out["redis_keys"] = _run(cluster, EXT, "redis", *map(str, out["redis"]),
                                 REDIS_PASSWORD, storage)["keys"]
        out["reference"] = _stream(cluster, w1_url, model)
        t["reference_s"] = time.monotonic() - started

        proc, lines = _start_stream(cluster, w1_url, model)
        arrivals: list[float] = []
        while len(arrivals) < KILL_AFTER_TOKENS:
            line = lines.get(timeout=120)
            assert line and line.startswith("TOKENS "), \
                f"the stream ended before the kill: {line}\n{_client_log()}"
            arrivals.append(float(line.split()[2]))
        out["loss"] = _lose_the_head(cluster)
        out["during"] = _finish_stream(proc, lines, arrivals)
        out["arrivals_after_head_gone"] = sum(a > out["loss"]["head_gone_at"] for a in arrivals)
        out["while_headless"] = _stream(cluster, w1_url, model, SHORT)
        t["headless_done_s"] = time.monotonic() - started

        # the head comes back as KubeRay brings it back: the same address, Redis and
        # storage namespace, in a new container (a fresh temp dir: with the old one's
        # address file, `ray start` would take w1's processes, which name the GCS address
        # in this shared process table, for a head still running there)
        cluster.hosts[HEAD].temp_dir = netns.RUN_DIR / "head-restarted"
        cluster.start_node(HEAD)
        out["after"] = _wait_healed(cluster, out["before"])
        t["healed_s"] = time.monotonic() - started
        out["after_via_w1"] = _stream(cluster, w1_url, model, SHORT)
        out["after_via_head"] = _stream(cluster, head_url, model, SHORT)
        t["total_s"] = time.monotonic() - started
    out["timings"]["heal_waited_s"] = out["after"].get("waited_s", -1)
    print("head failure timings:", {k: round(v, 1) for k, v in out["timings"].items()})
    return out


def _ours(state: dict) -> dict[str, list[dict]]:
    """Our actors in Ray's actor table, by class: the API replica, the engine service, the
    worker."""
    by_class: dict[str, list[dict]] = {}
    for actor in state["actors"]:
        for mark in ("OpenAIServer", "EngineService", "Worker"):
            if mark in actor["class"]:
                by_class.setdefault(mark, []).append(actor)
    return by_class


def test_gcs_keeps_its_tables_in_redis(report):
    assert report["redis_keys"], "the GCS wrote nothing under its storage namespace"
    assert any(k.endswith("@NODE") for k in report["redis_keys"]), report["redis_keys"]


def test_api_replica_and_engine_run_off_the_head(report):
    w1, head = report["hosts"][W1], report["hosts"][HEAD]
    ours = _ours(report["before"])
    assert set(ours) == {"OpenAIServer", "EngineService", "Worker"}, report["before"]["actors"]
    for actors in ours.values():
        assert {a["ip"] for a in actors} == {w1}, actors
    assert any("ServeController" in a["class"] and a["ip"] == head
               for a in report["before"]["actors"])


def test_stream_from_a_worker_node_survives_the_head_loss(report):
    reference, during = report["reference"], report["during"]
    assert reference["error"] is None and reference["tokens"] == MAX_TOKENS, reference
    assert reference["finish"] == "length"
    assert len(reference["text"].split()) == MAX_TOKENS
    # its first tokens are transformers' (token i reads "w<i>")
    assert reference["text"].split()[:SHORT] == [f"w{t}" for t in report["transformers"]]
    assert during["error"] is None, during
    assert during["tokens"] == MAX_TOKENS and during["finish"] == "length"
    assert during["text"] == reference["text"]  # every token, none twice
    assert report["arrivals_after_head_gone"] > 0, "the stream ended before the head was gone"
    # and a request that arrives with no head at all is served from the worker node
    assert report["while_headless"]["error"] is None
    assert report["while_headless"]["text"].split() == reference["text"].split()[:SHORT]
    print("head loss:", {k: v for k, v in report["loss"].items() if not k.endswith("_at")},
          "chunks after the head was gone:", report["arrivals_after_head_gone"])


def test_cluster_heals_when_the_head_comes_back(report):
    before, after = report["before"], report["after"]
    assert after.get("nodes") and after["error"] is None, after
    w1 = report["hosts"][W1]
    w1_before = next(n["id"] for n in before["nodes"] if n["ip"] == w1)
    old_head = next(n["id"] for n in before["nodes"] if n["ip"] == report["hosts"][HEAD])
    alive = {n["id"]: n["ip"] for n in after["nodes"] if n["alive"]}
    assert alive.get(w1_before) == w1, after["nodes"]  # the same worker node, reconnected
    assert old_head not in alive
    assert report["hosts"][HEAD] in alive.values(), after["nodes"]  # the new head
    assert after["app_status"] == "ApplicationStatus.RUNNING"
    # nothing of ours was restarted: same actors, no restarts, the same engine instance
    ours_before, ours_after = _ours(before), _ours(after)
    for mark in ("OpenAIServer", "EngineService", "Worker"):
        assert [a["id"] for a in ours_after[mark]] == [a["id"] for a in ours_before[mark]], mark
        assert all(a["restarts"] == 0 for a in ours_after[mark]), ours_after[mark]
    assert after["incarnation"] == before["incarnation"]
    assert after["engine_status"] == "ready"
    for key in ("after_via_w1", "after_via_head"):
        assert report[key]["error"] is None, report[key]
        assert report[key]["text"].split() == report["reference"]["text"].split()[:SHORT], key
