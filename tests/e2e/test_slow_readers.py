"""Streaming clients that do not read (issue 35, item 6), against a real API replica (direct
ingress) on a real local Ray, a tiny checkpoint written by transformers.

- A client that sends a streaming request with 20 logprobs a token and then reads nothing is
  dropped: its request is aborted long before its ``max_tokens`` (its events no longer pile
  up in the API replica), while a client reading beside it gets every token.
- The load of the issue's acceptance: 1000 streaming clients reading one byte a second, with
  logprobs, held for ``HOLD_S`` once every one of their requests is open on the engine; the
  API replica's resident memory stays within :func:`_memory_bound` of what it was before,
  ``/health`` answers within a second throughout, and a client reading normally beside them
  keeps getting tokens. The figures are printed (``pytest -s``), the arrival's apart.

Slow clients are raw sockets with a small receive buffer; each also advertises a 1400-byte
segment size (``TCP_MAXSEG``), as over a real network link: loopback's 64 KiB segments let
the kernel take a few megabytes for each connection before the server sees a full socket."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time

import psutil
import pytest
import ray
import requests
from aiohttp import ClientSession, ClientTimeout

from cluster.contract.config import EngineConfig
from tests.checkpoints import write_tiny_checkpoint
from workers.comm import find_free_port

pytestmark = pytest.mark.slow
NAME = "slowread"
STALL_S = 5.0  # deployment.stream_stall_timeout_s here (30 s by default): slots turn over
BUFFER_BYTES = 256 << 10  # deployment.stream_buffer_bytes here (1 MiB by default)
SLOW_CLIENTS = 1000
HOLD_S = 20.0
PROMPT = [5, 17, 33, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("slowread"), seed=7,
                                 max_position_embeddings=8192)


@pytest.fixture(scope="module")
def api(ray_session, tiny):
    """(base URL, port, the engine service, the API replica's process, its config)."""
    from cluster.serving.http.deploy import deploy, shutdown

    config = EngineConfig().with_overrides(
        dtype="float32", model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5,
        threads_per_worker=1, kv_cache_bytes=64 << 20, name=NAME, namespace=NAME,
        max_open_requests=SLOW_CLIENTS + 100, stream_stall_timeout_s=STALL_S,
        stream_buffer_bytes=BUFFER_BYTES)
    port = find_free_port("127.0.0.1")
    try:
        base = deploy(config, port=port).removesuffix("/v1")
        deadline = time.monotonic() + 300
        while not _ready(base):
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.5)
        yield base, port, ray.get_actor(NAME, namespace=NAME), _listener(port), config
    finally:
        shutdown(NAME, NAME)


def _ready(base: str) -> bool:
    try:
        return requests.get(base + "/health", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def _listener(port: int) -> psutil.Process:
    """The process listening on ``port``: the API replica (direct ingress)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing of ours listens on {port}")


def _body(model: str, max_tokens: int, logprobs: int) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "logprobs": logprobs,
            "stream": True, "temperature": 0, "ignore_eos": True}


def _generated(base: str) -> float:
    text = requests.get(base + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("shardlm:generation_tokens_total"))


def _wait_idle(engine, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(engine.stats.remote())
        if stats["open_requests"] == stats["num_running"] == stats["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"requests still run: {stats}"
        time.sleep(0.5)


async def _open_slow(port: int, body: dict) -> socket.socket:
    """A connection that has sent ``body`` as a streaming request and reads nothing yet."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    payload = json.dumps(body).encode()
    await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                                  b"Content-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


async def _trickle(sock: socket.socket, got: list[int], i: int) -> None:
    """Read one byte a second, for ever (cancelled at the end)."""
    loop = asyncio.get_running_loop()
    while True:
        if not await loop.sock_recv(sock, 1):
            return
        got[i] += 1
        await asyncio.sleep(1.0)


def _client(base: str) -> ClientSession:
    return ClientSession(base, timeout=ClientTimeout(total=None, sock_read=120))


async def _read_normally(client: ClientSession, body: dict, seen: list[float]) -> bool:
    """Stream ``body``, noting when each token arrives; whether it ended with [DONE]."""
    async with client.post("/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return True
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    now = time.monotonic()
                    seen += [now] * len((choice.get("logprobs") or {}).get("tokens") or [])
    return False


def test_a_client_that_does_not_read_is_dropped_and_the_one_beside_it_goes_on(api, tiny):
    base, port, engine, _, _ = api
    asked, read_tokens = 6000, 500
    before = _generated(base)

    async def run():
        sock = await _open_slow(port, _body(str(tiny), asked, 20))
        try:
            async with _client(base) as client:
                seen: list[float] = []
                done = await _read_normally(client, _body(str(tiny), read_tokens, 20), seen)
            # nothing read meanwhile: its request ends (dropped) while it is still connected
            await asyncio.to_thread(_wait_idle, engine, STALL_S + 60)
            return done, len(seen)
        finally:
            sock.close()

    done, tokens = asyncio.run(run())
    assert done and tokens == read_tokens
    unread = _generated(base) - before - read_tokens
    assert 0 < unread < asked / 2, (
        f"the client that read nothing had {unread:.0f} of its {asked} tokens generated")


def _memory_bound(config: EngineConfig, connections: int) -> int:
    """What streaming clients that read nothing may cost the API replica, in bytes: the
    backlog of each request generating (at most max_num_seqs at once), up to
    stream_buffer_bytes; for each connection uvicorn's write buffer (64 KiB and a chunk) and
    what an open request holds in the replica (parser, parsed body, stream, tasks, a journal
    of 4 bytes a token sent; 96 KiB, generously, at these lengths)."""
    running = config.scheduler.max_num_seqs
    return running * config.deployment.stream_buffer_bytes + connections * (160 << 10)


def test_a_thousand_clients_reading_a_byte_a_second(api, tiny):
    """Measured while they are connected: from the moment every one of them has its request
    open on the engine (the burst of their arrival, reported apart, is admission, not
    reading), for HOLD_S."""
    base, port, engine, replica, config = api
    model = str(tiny)
    requests.post(base + "/v1/completions", timeout=60, json=_body(model, 8, 5) | {
        "stream": False})  # everything a request touches is loaded before measuring
    rss_before = replica.memory_info().rss
    rss, burst, health, seen = [rss_before], [], [], []

    async def probe(client: ClientSession, into: list[float]) -> None:
        t0 = time.monotonic()
        async with client.get("/health") as response:
            assert response.status == 200, await response.text()
        into.append(time.monotonic() - t0)
        rss.append(replica.memory_info().rss)
        await asyncio.sleep(0.5)

    async def run():
        async with _client(base) as client:
            normal = asyncio.create_task(_read_normally(client, _body(model, 7000, 5), seen))
            while not seen:  # it runs before the others arrive
                await asyncio.sleep(0.1)
            started = time.monotonic()
            socks = await asyncio.gather(*[_open_slow(port, _body(model, 4000, 5))
                                           for _ in range(SLOW_CLIENTS)])
            got = [0] * SLOW_CLIENTS
            readers = [asyncio.create_task(_trickle(s, got, i)) for i, s in enumerate(socks)]
            while (await asyncio.to_thread(ray.get, engine.stats.remote()))[
                    "open_requests"] < SLOW_CLIENTS:
                assert time.monotonic() - started < 120, "the requests were not all opened"
                await probe(client, burst)
            opened = time.monotonic()
            while time.monotonic() - opened < HOLD_S:
                await probe(client, health)
            after_hold = [t for t in seen if t > opened]
            for task in readers + [normal]:
                task.cancel()
            await asyncio.gather(*readers, normal, return_exceptions=True)
            for sock in socks:
                sock.close()
            return opened - started, after_hold, got

    arrival, after_hold, got = asyncio.run(run())
    stats = _wait_idle(engine, 120)
    bound = _memory_bound(config, SLOW_CLIENTS + 1)
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    mib = 1 / 2**20
    print(f"\n{SLOW_CLIENTS} clients reading 1 B/s with logprobs: all open on the engine "
          f"{arrival:.1f} s after the first connected (/health then: max "
          f"{max(burst, default=0) * 1e3:.0f} ms over {len(burst)} probes), then held "
          f"{HOLD_S:.0f} s. API replica RSS {rss_before * mib:.0f} MiB before, peak "
          f"{max(rss) * mib:.0f} MiB (+{(max(rss) - rss_before) * mib:.0f} MiB; bound "
          f"+{bound * mib:.0f} MiB), {rss[-1] * mib:.0f} MiB at the end; /health while held: "
          f"median {statistics.median(health) * 1e3:.0f} ms, max {max(health) * 1e3:.0f} ms "
          f"({len(health)} probes); the normal reader: {len(seen)} tokens, {len(after_hold)} "
          f"while held, longest gap {max(gaps):.2f} s; {sum(g > 0 for g in got)} slow clients "
          f"got a response started ({sum(got)} bytes read in all); the engine generated "
          f"{stats['generation_tokens']} tokens")
    assert max(rss) - rss_before <= bound
    assert max(health) < 1.0
    assert after_hold, "the client reading normally got no token while the slow ones held"
