"""The two ways into the HTTP API (``cluster.serving.http.deploy``): direct ingress, where the
API replicas listen on the port themselves (``shardlm serve``'s default), and Serve's proxy
(KubeRay's path). Real Ray Serve, real HTTP; a tiny checkpoint written by transformers.

- Direct: Serve starts no proxy; two replicas bind the one port (without ``SO_REUSEPORT`` the
  second could not, and the deployment would never be healthy); with one of them killed,
  every request is still answered by the other on the same port; the answers are the
  engine's greedy tokens, equal to what Serve's proxy door gives for the same requests.
- A port already taken is refused before anything starts, naming the address.
- Proxy: Serve's proxy takes the requests."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import ray
import requests
from ray import serve

from cluster.contract.config import EngineConfig
from tests.checkpoints import write_tiny_checkpoint
from workers.comm import find_free_port

pytestmark = pytest.mark.slow
NAME = "ingress"
DEPLOY_TIMEOUT_S = 180
PROMPTS = [[5 + i, 17, 33 + 2 * i, 9] for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("ingress"), seed=7)


def _config(tiny) -> EngineConfig:
    return EngineConfig().with_overrides(
        dtype="float32", model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5,
        threads_per_worker=1, kv_cache_bytes=1 << 22, name=NAME, namespace=NAME)


def _complete(url: str, model: str, prompt: list[int], timeout: float = 60) -> list[int]:
    """The completion's tokens (their text is the tiny vocabulary's; ids via logprobs)."""
    r = requests.post(url + "/completions", timeout=timeout, json={
        "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _wait_answering(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the API did not become ready"
        time.sleep(0.5)


def _replica_actors() -> list:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "OpenAIServer" in a["name"]]
    return [ray.get_actor(n, namespace="serve") for n in names]


def test_direct_ingress_replicas_share_the_port_and_survive_one_lost(ray_session, tiny):
    from cluster.serving.http.deploy import deploy, shutdown

    config, port = _config(tiny), find_free_port("127.0.0.1")
    try:
        url = _within(DEPLOY_TIMEOUT_S, lambda: deploy(config, port=port, num_replicas=2))
        _wait_answering(url)
        assert serve.status().proxies == {}, "direct ingress starts no Serve proxy"
        replicas = _replica_actors()
        assert len(replicas) == 2
        direct = [_complete(url, str(tiny), p) for p in PROMPTS]
        ray.kill(replicas[0], no_restart=False)  # Serve replaces it; the other keeps the port
        time.sleep(1.0)
        for _ in range(3):
            assert [_complete(url, str(tiny), p) for p in PROMPTS] == direct
    finally:
        shutdown(NAME, NAME)
    proxied_url = _deploy_proxy(tiny)
    try:
        assert serve.status().proxies, "the proxy door runs Serve's proxy"
        assert [_complete(proxied_url, str(tiny), p) for p in PROMPTS] == direct
    finally:
        shutdown(NAME, NAME)


def _within(seconds: float, call):
    """``call()``'s result, or a failure once ``seconds`` pass (a replica that cannot start
    keeps Serve retrying it, and ``serve.run`` waiting, for ever)."""
    done: dict = {}

    def run() -> None:
        try:
            done["value"] = call()
        except BaseException as exc:  # handed to the test's thread
            done["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the deployment did not become ready in {seconds} s"
    if "error" in done:
        raise done["error"]
    return done["value"]


def _deploy_proxy(tiny) -> str:
    from cluster.serving.http.deploy import deploy

    url = deploy(_config(tiny), port=find_free_port("127.0.0.1"), ingress="proxy")
    _wait_answering(url)
    return url


def test_a_taken_port_or_an_unknown_ingress_is_refused_before_anything_starts(ray_session, tiny):
    from cluster.serving.http.deploy import deploy

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            deploy(_config(tiny), port=port)
    finally:
        taken.close()
    with pytest.raises(ValueError, match="ingress='sideways'"):
        deploy(_config(tiny), port=port, ingress="sideways")
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert NAME not in names, "no engine service was started"
