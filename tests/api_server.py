"""A real OpenAI-compatible server for tests: the Ray Serve app of
cluster.serving.http.app in front of an engine service (the default model at tp=2, float32
so that greedy text and logprobs can be compared with transformers), and helpers to call it."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass

import openai
import requests

from cluster.checkpoints.store import DEFAULT_MODEL
from cluster.contract.config import EngineConfig
from workers.comm import find_free_port

API_KEY = "sk-test-4c1d"
PROMPT = "The capital of France is"


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    client: openai.OpenAI
    engine: object  # the engine service actor handle
    while_starting: list  # completions asked for while /health said "starting"

    def post(self, path: str, body=None, key: str | None = API_KEY, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        return requests.post(self.base + path, data=body, headers=headers, timeout=120, **kwargs)

    def stats(self) -> dict:
        import ray

        return ray.get(self.engine.stats.remote())

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.base + "/metrics", timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name)

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Stats once nothing runs or waits and every KV block is free."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = (stats["num_running"] == 0 and stats["num_waiting"] == 0
                    and stats["num_free_blocks"] == stats["num_blocks"])
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)


def wait_until_ready(base: str, timeout: float = 300.0, while_waiting=None) -> float:
    """Poll ``GET {base}/health``, the API's documented readiness signal (503 with
    ``Retry-After`` and the state while the engine starts or recovers, 200 once it serves),
    until it answers 200; the seconds waited. ``deploy`` returns once the API replicas are up,
    not the engine (it loads the model in the background), so a test that sends requests
    right after deploying waits here first. Fails at once if the engine failed to start,
    and past ``timeout`` with the last answer. ``while_waiting``: called with each 503's
    state."""
    started = time.monotonic()
    while True:
        try:
            health = requests.get(base + "/health", timeout=30)
        except requests.ConnectionError as exc:  # the listener not bound yet
            last = repr(exc)
        else:
            if health.status_code == 200:
                return time.monotonic() - started
            assert health.status_code == 503 and health.headers.get("retry-after"), health.text
            assert health.json()["status"] != "failed", f"the engine failed to start: {health.text}"
            last = health.text
            if while_waiting is not None:
                while_waiting(health.json())
        waited = time.monotonic() - started
        assert waited < timeout, (f"the engine at {base} was not ready after {waited:.0f} s "
                                  f"(GET /health: {last})")
        time.sleep(1)


@contextmanager
def serve_api(name: str, **overrides):
    """Deploy the API (engine service and Serve app both named ``name``; ``overrides``: more
    config fields, or other values of the defaults here), wait until /health is ready (asking for completions while it says
    starting), yield the Server."""
    import ray

    from cluster.serving.http.deploy import deploy, shutdown

    port = find_free_port("127.0.0.1")
    config = EngineConfig().with_overrides(**{
        "dtype": "float32", "tensor_parallel_size": 2, "cpus_per_worker": 0.5,
        "kv_cache_bytes": 64 << 20, "name": name, "namespace": name, **overrides})
    url = deploy(config, port=port, api_keys=[API_KEY])
    base = url.removesuffix("/v1")
    try:
        while_starting = []

        def ask_while_starting(state: dict) -> None:
            if state["status"] == "starting" and len(while_starting) < 3:
                while_starting.append(requests.post(
                    url + "/completions", json={"model": DEFAULT_MODEL, "prompt": PROMPT},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120))

        wait_until_ready(base, timeout=600, while_waiting=ask_while_starting)
        engine = ray.get_actor(name, namespace=name)
        yield Server(base, openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0), engine,
                     while_starting)
    finally:
        shutdown(name, name)


def error_of(response: requests.Response, status: int, param: str | None = "any") -> dict:
    """The OpenAI-shaped error of ``response``, checked: that status, exactly the fields
    message, type, param and code, a message, and (unless "any") that param."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error
