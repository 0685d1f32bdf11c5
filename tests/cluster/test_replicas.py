"""Several engines behind one endpoint (``deployment.replicas``).

- Routing by prefix: a workload of requests sharing a few long prompt prefixes, each engine's
  KV cache too small to hold every prefix, goes through the router with ``prefix`` and then
  with ``random`` routing; the engines' own prefix-cache counters (blocks found in the cache
  at admission) must show a clearly higher hit rate for prefix routing. Both rates printed.
- The HTTP API over two engines: every request answered identically to a single engine,
  /metrics carries both engines' samples, and SIGKILL of one engine under load (16 open
  streams) loses no request while /health stays ready (the other engine serves).
- Routing by health: while an engine is ready, none goes to one that is starting,
  recovering or failed (prefix affinity among the ready ones); with none ready, to the one
  that takes requests soonest. Through the HTTP API, with one engine that cannot start (its
  checkpoint not there yet), every request is answered by the other; once it starts, requests
  reach it again."""

from __future__ import annotations

import random
import shutil
import threading
import time

import openai
import pytest
import ray
import requests

from cluster.contract.config import EngineConfig
from cluster.serving.router import Router, routing_key
from cluster.serving.service import (get_or_start_service, get_or_start_services, replica_config,
                                     replica_name, stop_services)
from cluster.serving.stream import RequestStream
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready
from workers.comm import find_free_port

NAME = "replicas"
BLOCK = 4
PREFIX_BLOCKS = 16  # a shared prefix: 64 tokens
PREFIXES, PER_PREFIX = 8, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("replicas"), seed=4)


def _config(tiny, **overrides) -> EngineConfig:
    # per engine, room for about 5 of the 8 prefixes' blocks
    per_block = 2 * 2 * BLOCK * 3 * 8 * 4  # K and V x layers x tokens x kv heads x dim x fp32
    return EngineConfig().with_overrides(dtype="float32", **{
        "model": str(tiny), "tensor_parallel_size": 1, "cpus_per_worker": 0.5,
        "block_size": BLOCK, "kv_cache_bytes": per_block * PREFIX_BLOCKS * 5, "name": NAME,
        "namespace": NAME, "replicas": 2, "threads_per_worker": 1, **overrides})


def _workload() -> list[list[int]]:
    rng = random.Random(11)
    prefixes = [[rng.randrange(1, 150) for _ in range(BLOCK * PREFIX_BLOCKS)]
                for _ in range(PREFIXES)]
    prompts = [p + [rng.randrange(1, 150) for _ in range(6)] for p in prefixes
               for _ in range(PER_PREFIX)]
    rng.shuffle(prompts)
    return prompts


def _hit_rate(services, policy: str, prompts: list[list[int]]) -> float:
    for s in services:  # forget cached prefixes, start counting from here
        ray.get(s.reset_for_benchmark.remote())
    before = sum(ray.get(s.stats.remote())["prefix_cache_hits"] for s in services)
    router = Router(len(services), policy, seed=3)
    for ids in prompts:
        replica = router.pick(routing_key(prompt_token_ids=ids))
        RequestStream(services[replica], prompt_token_ids=ids,
                      params={"max_tokens": 2, "temperature": 0}).final()
    hits = sum(ray.get(s.stats.remote())["prefix_cache_hits"] for s in services) - before
    return hits / (len(prompts) * PREFIX_BLOCKS)


def test_prefix_routing_finds_more_cached_prefixes_than_random(ray_session, tiny):
    config = _config(tiny)
    services = get_or_start_services(config)
    try:
        wait_ready(*services)
        prompts = _workload()
        by_prefix = _hit_rate(services, "prefix", prompts)
        by_chance = _hit_rate(services, "random", prompts)
        print(f"prefix-cache hit rate over {len(prompts)} requests, 2 engines: prefix routing "
              f"{by_prefix:.2f}, random routing {by_chance:.2f}")
        assert by_prefix > by_chance + 0.15
    finally:
        stop_services(NAME, NAME, replicas=2)


def test_router_passes_over_a_much_busier_engine():
    router = Router(2, "prefix")
    key = routing_key(prompt="a long shared system prompt, " * 8)
    home = router.pick(key)
    assert all(router.pick(key) == home for _ in range(5))  # stable
    for _ in range(4):
        router.opened(home)
    assert router.pick(key) == home  # 4 open against 0: within 2 x 0 + SLACK
    router.opened(home)
    assert router.pick(key) == 1 - home  # 5 open against 0: much busier, the other engine


def _keys(count: int, salt: str = "") -> list[list[bytes]]:
    return [routing_key(prompt=f"{salt}system prompt {i}: be brief. " * 4) for i in range(count)]


def test_router_passes_over_engines_that_are_not_ready():
    """Starting, recovering and failed engines get nothing while another is ready; the ready
    ones keep their prompts (prefix affinity among them), and a busy ready engine is never
    relieved onto one that is not ready."""
    keys = _keys(30)
    homes = [Router(3).pick(k) for k in keys]  # nothing told yet: every engine counts as ready
    assert set(homes) == {0, 1, 2}
    for status in ("starting", "recovering", "failed", "unavailable"):
        router = Router(3)
        for replica, state in enumerate(["ready", status, "ready"]):
            router.observe(replica, state)
        picks = [router.pick(k) for k in keys]
        assert 1 not in picks, status  # today's router: every prompt whose home is 1 goes there
        assert all(p == h for p, h in zip(picks, homes) if h != 1), status  # affinity kept
        assert set(picks) == {0, 2}
    router = Router(2)
    router.observe(0, "ready")
    router.observe(1, "failed", retry_in_s=30)
    for _ in range(20):
        router.opened(0)  # 20 open against 0: much busier, but the other is not ready
    assert {router.pick(k) for k in keys} == {0}
    router.observe(1, "ready")  # back: new prompts reach it again
    assert 1 in {router.pick(k) for k in _keys(30, "new ")}
    router = Router(3, "random", seed=5)
    router.observe(0, "recovering")
    assert {router.pick([]) for _ in range(100)} == {1, 2}


def test_router_with_no_ready_engine_picks_the_one_that_serves_soonest():
    """None ready: a recovering engine (requests wait there) before a starting one, before a
    failed one; of failed ones, the one whose next try comes first; several equally placed
    engines are chosen among as before (the prefix choice)."""
    keys = _keys(30)
    router = Router(3)
    for replica, (state, retry) in enumerate([("failed", 1), ("starting", None), ("recovering", None)]):
        router.observe(replica, state, retry)
    assert {router.pick(k) for k in keys} == {2}
    router.observe(2, "failed", 9)
    assert {router.pick(k) for k in keys} == {1}
    router.observe(1, "failed", 5)
    assert {router.pick(k) for k in keys} == {0}  # tries again in 1 s: the soonest
    router.observe(0, "unavailable")
    assert {router.pick(k) for k in keys} == {1}
    recovering = Router(3)
    for replica in range(3):
        recovering.observe(replica, "recovering")
    assert [recovering.pick(k) for k in keys] == [Router(3).pick(k) for k in keys]


def test_router_health_is_trusted_for_a_while_and_doubted_after_a_refusal():
    """The front door asks the engines (again) only when what it was told is older than
    ``health_ttl_s``, when no engine was ready, or after an engine refused a request."""
    router = Router(2, health_ttl_s=2.0)
    assert not router.ready_known(now=100.0)  # never told
    router.observe(0, "ready", now=100.0)
    assert not router.ready_known(now=100.5)  # engine 1 not heard of yet
    router.observe(1, "recovering", now=100.5)
    assert router.ready_known(now=101.0)
    assert not router.ready_known(now=102.1)  # stale
    router.observe(0, "ready", now=102.1)
    router.observe(1, "ready", now=102.1)
    router.doubt()  # a 503 from an engine
    assert not router.ready_known(now=102.2)
    assert router.status == ["ready", "ready"]  # still routed by until told again
    router.observe(0, "failed", 5, now=102.3)
    router.observe(1, "starting", now=102.3)
    assert not router.ready_known(now=102.4)  # none ready: ask on every request


def _tokens_made(actor) -> float:
    """The engine's ``shardlm:generation_tokens_total`` (its own /metrics samples)."""
    lines = ray.get(actor.metrics_text.remote(), timeout=30).splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("shardlm:generation_tokens_total{"))


def test_the_api_routes_only_to_the_ready_engine(ray_session, tiny, tmp_path):
    """Replica 1's engine cannot start (its checkpoint is not there yet: failed, trying again
    every second or two): each of 12 requests, half of whose prompts the router would send to
    replica 1 by prefix, is answered through the HTTP API by replica 0, and /health is ready.
    Today's router sends those to replica 1, which refuses them (503). The checkpoint arrives,
    replica 1 starts, and new prompts reach it again."""
    from cluster.serving.http.deploy import deploy, shutdown

    name = "routing-health"
    model = tmp_path / "arrives-later"
    config = _config(tiny, name=name, namespace=name, kv_cache_bytes=1 << 22)
    # replica 1 first, from a config whose checkpoint is missing: deploy finds it by its name
    late = get_or_start_service(replica_config(config.with_overrides(
        model=str(model), start_backoff_s=1.0, start_backoff_max_s=2.0), 1))
    port = find_free_port("127.0.0.1")
    try:
        url = deploy(config, port=port)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        ready = ray.get_actor(replica_name(name, 0), namespace=name)
        wait_ready(ready)
        assert ray.get(late.health.remote(), timeout=30)["status"] in ("failed", "starting")
        prompts = [[(7 * i + 3 * j) % 150 + 1 for j in range(20)] for i in range(12)]
        homes = [Router(2).pick(routing_key(prompt_token_ids=p)) for p in prompts]
        assert homes.count(1) >= 3  # the test means something: replica 1 is their home
        before = _tokens_made(ready)
        for prompt in prompts:
            out = client.completions.create(model=str(tiny), prompt=prompt, max_tokens=3,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 3
        assert _tokens_made(ready) - before == 3 * len(prompts)  # all of them by replica 0
        health = requests.get(url.removesuffix("/v1") + "/health", timeout=30)
        assert health.status_code == 200, health.text

        shutil.move(write_tiny_checkpoint("llama-gqa", tmp_path / "writing", seed=4), model)
        wait_ready(late)
        rng, deadline = random.Random(5), time.monotonic() + 60
        while _tokens_made(late) == 0:  # the front door learns it is ready within its TTL
            assert time.monotonic() < deadline, "replica 1 got no request once ready"
            for _ in range(6):  # prompts not sent before (a sent one stays where it went)
                client.completions.create(
                    model=str(tiny), prompt=[rng.randrange(1, 150) for _ in range(20)],
                    max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
            time.sleep(0.5)
    finally:
        shutdown(name, name, replicas=2)


@pytest.fixture(scope="module")
def http(ray_session, tiny):
    from cluster.serving.http.deploy import deploy, shutdown

    port = find_free_port("127.0.0.1")
    config = _config(tiny, kv_cache_bytes=1 << 22)
    url = deploy(config, port=port)
    services = [ray.get_actor(replica_name(NAME, k), namespace=NAME) for k in range(2)]
    wait_ready(*services)
    yield url, openai.OpenAI(base_url=url, api_key="unused", max_retries=0), str(tiny), services
    shutdown(NAME, NAME, replicas=2)


def _prompt(i: int) -> list[int]:
    return [(11 * i + 5 * j) % 150 + 1 for j in range(4 + 3 * i)]


def test_two_engines_behind_one_endpoint_lose_nothing_when_one_dies(http):
    """16 streams routed over both engines (the HTTP app's router and RequestStream); one
    engine is killed mid-generation: every stream ends with exactly the tokens of a run
    without the failure, and /health stays ready while the other engine serves."""
    url, client, model, services = http
    router = Router(2, "prefix")

    def routed(i: int) -> RequestStream:
        replica = router.pick(routing_key(prompt_token_ids=_prompt(i)))
        return RequestStream(services[replica], prompt_token_ids=_prompt(i),
                             params={"max_tokens": 150, "temperature": 0, "ignore_eos": True})

    expected = [routed(i).final()["outputs"][0]["token_ids"] for i in range(16)]
    assert {router.pick(routing_key(prompt_token_ids=_prompt(i))) for i in range(16)} == {0, 1}
    received: dict[int, list[int]] = {i: [] for i in range(16)}
    errors: list[BaseException] = []
    counted = threading.Semaphore(0)

    def one(i: int) -> None:
        try:
            for event in routed(i):
                if event["type"] == "delta":
                    received[i] += event["token_ids"]
                    counted.release()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for _ in range(100):
        assert counted.acquire(timeout=120)
    chaos.kill_engine(replica_name(NAME, 1), NAME)
    health = requests.get(url.removesuffix("/v1") + "/health", timeout=30)
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [received[i] for i in range(16)] == expected
    assert health.status_code == 200, health.text  # the other engine serves meanwhile
    wait_ready(*services)


def test_the_api_over_two_engines(http):
    url, client, model, services = http
    for i in range(6):  # token-id prompts spread over both engines
        out = client.completions.create(model=model, prompt=_prompt(i), max_tokens=5,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
    metrics = requests.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    for name in (NAME, replica_name(NAME, 1)):
        assert f'shardlm:generation_tokens_total{{engine="{name}"' in metrics
    assert metrics.count("# TYPE shardlm:generation_tokens_total counter") == 1
