"""Online mode of ``shardlm bench``: the workload through the OpenAI-compatible HTTP API.

The engine is deployed the way users serve it (``cluster.serving.http.deploy.deploy``: Ray Serve's proxy
in front of the engine service) on a free local port. For each request rate the workload's
requests are sent with Poisson arrivals (exponential gaps from ``random.Random(seed + 2)``;
``inf`` sends them all at once), at most ``--concurrency`` in flight when given (like the
serving benchmarks users know: request rate plus a concurrency cap). Every request is a
streamed ``/v1/completions`` call with the prompt as token ids, greedy, ``ignore_eos`` and
``max_tokens`` = the output length. TTFT = first streamed chunk - the moment the request
was sent; TPOT = (last chunk - first chunk) / (tokens - 1), tokens from the usage the
stream reports at its end. Before each run the engine service forgets its cached prompt
prefixes (each run sends the same prompts); beside the client it is asked once a second for
its workers' resident memory, and at the end for the run's KV-cache usage peak and prefix
cache hits.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time

from cluster.bench.drive import engine_config, progress, summarize
from cluster.bench.options import BenchOptions


class RequestFailed(RuntimeError):
    pass


async def _one(session, url: str, model: str, prompt: list[int], output_len: int) -> dict:
    """Send one streamed completion; its send, first-chunk and end times and token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with session.post(f"{url}/completions", json=body) as response:
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RequestFailed(f"the stream reported an error: {chunk['error']}")
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"arrival": sent, "first": first, "finish": time.perf_counter(), "tokens": tokens}


def rate_label(rate: float) -> float | str:
    """A request rate as JSON can hold it: a number, or "inf" for all at once."""
    return rate if math.isfinite(rate) else "inf"


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: Poisson arrivals at ``rate`` per second."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 2)
    return [rng.expovariate(rate) for _ in range(n)]


async def _run_rate(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                    max_in_flight: int, opts: BenchOptions, label: str) -> dict:
    import aiohttp

    gate = asyncio.Semaphore(max_in_flight)
    done = [0]

    async def send(session, prompt):
        async with gate:
            result = await _one(session, url, model, prompt, output_len)
        done[0] += 1
        return result

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started, tasks = time.perf_counter(), []

        async def arrivals():
            for prompt, gap in zip(prompts, arrival_gaps(len(prompts), rate, opts.seed)):
                await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(send(session, prompt)))

        sender = asyncio.create_task(arrivals())
        while not sender.done() or not all(t.done() for t in tasks):
            await asyncio.wait([sender, *tasks], timeout=10.0, return_when=asyncio.ALL_COMPLETED)
            progress(opts, f"{label}: {len(tasks)} sent, {done[0]}/{len(prompts)} done, "
                           f"{time.perf_counter() - started:.0f} s")
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                sender.cancel()
                raise failed[0].exception()
        results = [t.result() for t in tasks]
    wall = max(r["finish"] for r in results) - started
    return {"wall_s": wall, "arrival": [r["arrival"] for r in results],
            "first": [r["first"] for r in results], "finish": [r["finish"] for r in results],
            "num_tokens": [r["tokens"] for r in results]}


async def _sampled(sampler: ServiceSampler, work):
    """Run ``work`` with the sampler going beside it; ``work``'s result."""
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))
    try:
        return await work
    finally:
        stop.set()
        await sampling


def _wait_ready(url: str, timeout_s: float = 600.0) -> None:
    import requests

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url.removesuffix("/v1") + "/health", timeout=10).json()
            if last.get("status") == "ready":
                return
        except (requests.RequestException, ValueError) as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"the server at {url} was not ready after {timeout_s:.0f} s: {last}")


class ServiceSampler:
    """Asks the engine service before a run to forget cached prompt prefixes (every run
    sends the same prompts) and to start a new KV peak; during it, each worker's resident
    memory about once a second (``worker_rss()``, peaks kept); at the end, the KV-cache
    usage peak (``stats()["kv_usage_peak"]``)."""

    def __init__(self, name: str, namespace: str):
        import ray

        self.service = ray.get_actor(name, namespace=namespace)
        ray.get(self.service.reset_for_benchmark.remote())  # no prefix reuse across runs
        self.kv_peak, self.rss = 0.0, {}
        self.hits_before = ray.get(self.service.stats.remote()).get("prefix_cache_hits", 0)
        self.prefix_cache_hits = 0  # during the run

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sample()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        await self._sample()

    async def _sample(self) -> None:
        stats, rss = await asyncio.gather(self.service.stats.remote(),
                                          self.service.worker_rss.remote())
        self.kv_peak = max(self.kv_peak, stats.get("kv_usage_peak", 0.0))
        self.prefix_cache_hits = stats.get("prefix_cache_hits", 0) - self.hits_before
        for name, value in rss.items():
            self.rss[name] = max(self.rss.get(name, 0), value)


def run_online(opts: BenchOptions, tp: int, prompts: list[list[int]]) -> dict:
    """Deploy the HTTP API at ``tp``, run every request rate, shut it down."""
    from cluster.serving.http.deploy import deploy, shutdown
    from workers.comm import find_free_port

    config = engine_config(opts, tp, f"bench-http-{os.getpid()}-tp{tp}")
    port = find_free_port("127.0.0.1")
    progress(opts, f"tp={tp}: deploying the HTTP API on port {port}")
    url = deploy(config, host="127.0.0.1", port=port)
    result = {"engine": "shardlm http", "mode": "online", "tp": tp, "points": []}
    try:
        _wait_ready(url)
        import ray

        dep = config.deployment
        stats = ray.get(ray.get_actor(dep.name, namespace=dep.namespace).stats.remote())
        result |= {k: stats[k] for k in ("device", "backend", "dtype")}
        result["threads"] = sum(stats["threads"])
        for rate in opts.request_rate:
            for cap in opts.concurrency or [len(prompts)]:
                label = f"shardlm http tp={tp} rate={rate:g}/s concurrency={cap}"
                sampler = ServiceSampler(dep.name, dep.namespace)
                trace = asyncio.run(_sampled(sampler, _run_rate(
                    url, config.model.model, prompts, opts.output_len, rate, cap, opts, label)))
                point = summarize(trace, prompts, cap) | {
                    "request_rate": rate_label(rate), "kv_usage_peak": sampler.kv_peak,
                    "prefix_cache_hits": sampler.prefix_cache_hits,
                    "worker_peak_rss_bytes": sampler.rss}
                result["points"].append(point)
                progress(opts, f"{label}: {point['output_tokens_per_s']:.1f} output tokens/s")
    finally:
        shutdown(config.deployment.name, config.deployment.namespace)
    return result
