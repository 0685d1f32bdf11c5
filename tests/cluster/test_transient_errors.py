"""A Ray error on a live engine is not the engine's loss.

A caller's stream can break with the engine actor alive: an RPC to the actor fails in
flight (``ActorUnavailableError``, "the task may or may not have been executed"), while the
engine goes on generating the request into a stream nobody reads. The failure is Ray's own
RPC fault injection (``RAY_testing_rpc_failure``: the client process's first actor call,
its ``generate``, fails in flight; Ray reports it about 2 s later), in a client process of its
own connected to this test's cluster; the engine's worker stalls 4 s in a step
(``chaos.hang_worker``) after the first token, so that the break comes mid-request. The stream must tell that from a restarted engine (the engine's incarnation is the
one it sent the request to) and take its request back there: the caller receives exactly
the tokens of a run without the failure (no duplicate-id 400), and the engine's count of
open requests comes back to 0 (the copy left behind frees its slot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cluster.contract.config import EngineConfig
from cluster.serving.client import Handle
from cluster.serving.service import get_or_start_service, stop_service
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

NAME = "transient"
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 9, 17, 33, 2, 71]
PARAMS = dict(max_tokens=240, temperature=0, ignore_eos=True)
# the client's first PushTask (its generate) fails after it reached the actor
FAULT = json.dumps({"CoreWorkerService.grpc_client.PushTask":
                    {"num_failures": 1, "in_flight_failure_prob": 100}})

CLIENT = r"""
import json, sys
import ray
from cluster.serving.stream import RequestStream
from cluster.tools import chaos
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
service = ray.get_actor(sys.argv[2], namespace=sys.argv[2])
tokens, out = [], {}
try:
    with RequestStream(service, prompt_token_ids=json.loads(sys.argv[3]),
                       params=json.loads(sys.argv[4])) as stream:
        for event in stream:
            if event["type"] == "delta":
                # after the first token the engine stalls 4 s in a step, so that the break
                # (reported about 2 s after the call) lands mid-request
                if not tokens:
                    chaos.hang_worker(sys.argv[5], sys.argv[2], seconds=4)
                tokens += event["token_ids"]
        out = {"retakes": stream.retakes, "resumes": stream.resumes}
except Exception as exc:
    out = {"error": f"{type(exc).__name__}: {exc}"}
print("RESULT " + json.dumps(dict(out, tokens=tokens)), flush=True)
"""


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("transient"), seed=3)
    config = EngineConfig().with_overrides(
        dtype="float32", model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5,
        block_size=4, kv_cache_bytes=1 << 22, name=NAME, namespace=NAME)
    actor = get_or_start_service(config)
    wait_ready(actor)
    yield Handle(actor)
    stop_service(NAME, NAME)


def _open_requests(service, want: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (n := service.stats()["open_requests"]) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


def test_a_stream_broken_on_a_live_engine_takes_its_request_back(service):
    started = time.monotonic()
    expected = service.generate(prompt_token_ids=PROMPT, **PARAMS).token_ids
    took = time.monotonic() - started
    before = service.health()
    env = dict(os.environ, RAY_testing_rpc_failure=FAULT, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, ray.get_runtime_context().gcs_address, NAME,
         json.dumps(PROMPT), json.dumps(PARAMS), chaos.worker_names(NAME)[0]],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    got = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"one request alone: {took:.2f} s; client: {got.get('retakes')} retakes, "
          f"{got.get('resumes')} resumes, error {got.get('error')}")
    assert "error" not in got, (got["error"], proc.stderr[-3000:])  # no duplicate_request_id 400
    assert got["tokens"] == expected  # none twice, none missing
    assert got["retakes"] == 1 and got["resumes"] == 0  # the break landed, on a live engine
    assert service.health()["incarnation"] == before["incarnation"]  # no restart happened
    assert _open_requests(service, 0) == 0  # the copy left behind freed its slot
