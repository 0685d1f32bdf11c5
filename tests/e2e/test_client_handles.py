"""Client handles: a second Python process attaches to the running deployment with
`connect()` and generates and streams, while HTTP requests run against the same engine; it
never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from cluster.contract.config import EngineConfig
from tests.api_server import wait_until_ready
from workers.comm import find_free_port

pytestmark = pytest.mark.slow
NAME = "handles"
ROOT = Path(__file__).parents[2]

SECOND_PROCESS = r"""
import asyncio, json, sys
from cluster import connect
h = connect(name=sys.argv[2], namespace=sys.argv[2], address=sys.argv[1])
out = {}
out["generate"] = h.generate("The capital of France is", max_tokens=8, temperature=0).text
out["stream"] = list(h.stream("The capital of France is", max_tokens=8, temperature=0))
out["chat"] = h.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0).text

async def many():
    done = await asyncio.gather(*[h.agenerate(f"Count to {i}:", max_tokens=6, temperature=0)
                                  for i in range(6)])
    pieces = [p async for p in h.astream("The capital of France is", max_tokens=8, temperature=0)]
    return [d.completion_tokens for d in done], pieces

out["agenerate_tokens"], out["astream"] = asyncio.run(many())
try:
    h.generate("", max_tokens=4)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
    out["error_param"] = getattr(exc, "param", None)
out["heavy_modules"] = sorted(m for m in ("torch", "transformers", "layers", "workers") if m in sys.modules)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def deployment(ray_session):
    import ray

    from cluster.serving.http.deploy import deploy, shutdown

    port = find_free_port("127.0.0.1")
    config = EngineConfig().with_overrides(dtype="float32", tensor_parallel_size=2, cpus_per_worker=0.5,
                                           kv_cache_bytes=64 << 20, name=NAME, namespace=NAME)
    url = deploy(config, port=port)
    # deploy returns once the API is up; the engine still loads the model, and until it is
    # ready /v1/* answers 503 "the engine is starting" (a handle's requests wait instead)
    waited = wait_until_ready(url.removesuffix("/v1"), timeout=300)
    print(f"the engine was ready {waited:.1f} s after deploy returned")
    yield url, ray.get_runtime_context().gcs_address
    shutdown(NAME, NAME)


def test_second_process_shares_the_engine_with_http(deployment):
    url, address = deployment
    # no silent retries: the engine is ready (the fixture waited), so every request is answered
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    http_texts, errors = [], []

    def http_load():
        try:
            for i in range(4):
                r = api.completions.create(model="smollm2-135m-instruct", prompt=f"Item {i}:",
                                           max_tokens=12, temperature=0)
                http_texts.append(r.choices[0].text)
        except Exception as exc:  # reported below
            errors.append(exc)

    load = threading.Thread(target=http_load)
    load.start()
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS, address, NAME], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    load.join(300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert not load.is_alive(), "the HTTP requests did not finish in 300 s"
    assert not errors and len(http_texts) == 4, (errors, http_texts)
    reference = api.completions.create(model="smollm2-135m-instruct", max_tokens=8, temperature=0,
                                       prompt="The capital of France is").choices[0].text
    assert out["generate"] == reference  # the same engine, the same greedy text
    assert "".join(out["stream"]) == reference and len(out["stream"]) > 1  # streamed in pieces
    assert "".join(out["astream"]) == reference
    assert out["agenerate_tokens"] == [6] * 6
    assert out["chat"]
    assert out["error"].startswith("RequestError: prompt is empty") and out["error_param"] == "prompt"
    assert out["heavy_modules"] == []  # a client process: connect, generate, stream, no torch
