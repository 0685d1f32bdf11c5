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

Peers (``--peer NAME=URL``): any other OpenAI-compatible server (``vllm serve``, SGLang, ...)
gets the same requests from the same client after shardlm's runs, each peer's model being
the first its ``GET /models`` lists; ``--peer-start NAME=COMMAND`` starts it then (so each
server has the machine to itself) and stops its process group after. The report gives each
shardlm point against each peer's point of the same rate and concurrency.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
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


class _NotYet(Exception):
    """A server polled by :func:`_poll` is not there yet (the message says how it answered)."""


def _poll(attempt, what: str, timeout_s: float, pause_s: float, process=None):
    """``attempt()``'s result once it stops raising _NotYet; TimeoutError naming ``what``
    and the last answer past ``timeout_s``; RuntimeError if ``process`` (a peer's start
    command) exits meanwhile."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the peer's start command exited with {process.returncode}")
        try:
            return attempt()
        except _NotYet as exc:
            last = str(exc)
        time.sleep(pause_s)
    raise TimeoutError(f"{what} in {timeout_s:.0f} s: {last}")


def _wait_ready(url: str, timeout_s: float = 600.0) -> None:
    import requests

    def ready() -> None:
        try:
            health = requests.get(url.removesuffix("/v1") + "/health", timeout=10).json()
        except (requests.RequestException, ValueError) as exc:
            raise _NotYet(repr(exc)) from None
        if health.get("status") != "ready":
            raise _NotYet(health)

    _poll(ready, f"the server at {url} was not ready", timeout_s, 1.0)


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


def _sweep(opts: BenchOptions, url: str, model: str, prompts: list[list[int]], name: str,
           sampler=None) -> list[dict]:
    """Every request rate x concurrency of the workload against one server; its points.
    ``sampler``: a callable making a ServiceSampler per point (shardlm's own server)."""
    points = []
    for rate in opts.request_rate:
        for cap in opts.concurrency or [len(prompts)]:
            label = f"{name} rate={rate:g}/s concurrency={cap}"
            work = _run_rate(url, model, prompts, opts.output_len, rate, cap, opts, label)
            watch = sampler() if sampler is not None else None
            trace = asyncio.run(_sampled(watch, work) if watch is not None else work)
            point = summarize(trace, prompts, cap) | {"request_rate": rate_label(rate)}
            if watch is not None:
                point |= {"kv_usage_peak": watch.kv_peak,
                          "prefix_cache_hits": watch.prefix_cache_hits,
                          "worker_peak_rss_bytes": watch.rss}
            points.append(point)
            progress(opts, f"{label}: {point['output_tokens_per_s']:.1f} output tokens/s")
    return points


def run_peer(opts: BenchOptions, name: str, prompts: list[list[int]], threads: int) -> dict:
    """Another OpenAI-compatible server (``--peer``) through the same client and requests,
    started by its ``--peer-start`` command when given and stopped after."""
    url = opts.peers[name].rstrip("/")
    process = None
    if name in opts.peer_start:
        progress(opts, f"peer {name}: starting it: {opts.peer_start[name]}")
        process = subprocess.Popen(opts.peer_start[name], shell=True, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        model = _peer_model(url, process)
        _warm_up(url, model, prompts[0][:16], process)
        points = _sweep(opts, url, model, prompts, f"peer {name}")
    finally:
        if process is not None:
            _stop(process)
    return {"engine": name, "mode": "online", "peer": url, "threads": threads, "points": points}


def _peer_model(url: str, process, timeout_s: float = 1200.0) -> str:
    """The first model a peer serves, once it answers ``GET /models``."""
    import requests

    def first_model() -> str:
        try:
            return requests.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
        except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
            raise _NotYet(repr(exc)) from None

    return _poll(first_model, f"the peer at {url} did not answer GET /models", timeout_s, 2.0,
                 process)


def _warm_up(url: str, model: str, prompt: list[int], process, timeout_s: float = 1200.0
             ) -> None:
    """A short completion, retried until the peer serves it (a server may list its model
    before it can generate: 503 while it starts)."""
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0}

    def complete() -> None:
        try:
            response = requests.post(f"{url}/completions", json=body, timeout=600)
        except requests.RequestException as exc:
            raise _NotYet(repr(exc)) from None
        answer = f"HTTP {response.status_code}: {response.text[:300]}"
        if response.status_code in (502, 503, 504):
            raise _NotYet(answer)
        if response.status_code != 200:
            raise RuntimeError(f"the peer at {url} does not complete a warm-up request: {answer}")

    _poll(complete, f"the peer at {url} did not complete a warm-up request", timeout_s, 2.0,
          process)


def _stop(process: subprocess.Popen) -> None:
    """Stop a started peer and everything it started (its process group)."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


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
        result["points"] = _sweep(opts, url, config.model.model, prompts,
                                  f"shardlm http tp={tp}",
                                  lambda: ServiceSampler(dep.name, dep.namespace))
    finally:
        shutdown(config.deployment.name, config.deployment.namespace)
    return result
