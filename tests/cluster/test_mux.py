"""An API replica's requests share one subscription to their engine service
(:class:`cluster.serving.mux.Mux`): their tokens equal transformers' greedy ones, a step's
tokens for all of them arrive together (fewer Ray items than events), and when the subscriber
goes away the service aborts its requests and frees their KV blocks. A request whose reader
does not read holds at most its backlog's bound, then is dropped and aborted alone, while a
stream read beside it gets every token."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from cluster.contract.config import EngineConfig
from cluster.contract.errors import ServiceError
from cluster.serving.service import get_or_start_service, stop_service
from cluster.serving.mux import Mux, MuxedRequestStream
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

NAME = "mux"
PROMPTS = [[(3 * i + 7 * j) % 150 + 1 for j in range(n)] for i, n in enumerate([5, 12, 3, 20, 8, 1])]
NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("mux"), seed=8,
                                 max_position_embeddings=4096)


@pytest.fixture(scope="module")
def service(ray_session, tiny):
    config = EngineConfig().with_overrides(dtype="float32", model=str(tiny), tensor_parallel_size=1,
                                           cpus_per_worker=0.5, block_size=4, kv_cache_bytes=1 << 25,
                                           name=NAME, namespace=NAME)
    actor = get_or_start_service(config)
    wait_ready(actor, timeout=120)
    yield actor
    stop_service(NAME, NAME)


def _params(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def _tokens(stream: MuxedRequestStream) -> list[int]:
    tokens = []
    async for event in stream:
        if event["type"] == "delta":
            tokens += event["token_ids"]
    return tokens


def test_requests_share_one_subscription(service, tiny):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS]

    async def run():
        streams = [MuxedRequestStream(service, prompt_token_ids=p, params=_params(NEW))
                   for p in PROMPTS]
        got = await asyncio.gather(*map(_tokens, streams))
        return got, Mux.of(service)

    got, mux = asyncio.run(run())
    assert got == expected
    events = len(PROMPTS) * (NEW + 1)  # a delta per token and a final event per request
    assert mux.items < events / 2, (mux.items, events)  # each step's events travel together


def test_a_subscriber_that_goes_away_frees_its_requests(service):
    async def run():
        # thousands of steps: left alone they would run for many seconds
        streams = [MuxedRequestStream(service, prompt_token_ids=p, params=_params(3000))
                   for p in PROMPTS]
        for stream in streams:  # every request is running
            await stream.__anext__()
        mux = Mux.of(service)
        ray.cancel(mux.stream)  # as if the replica were gone
        await asyncio.sleep(0.5)

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while True:
        stats = ray.get(service.stats.remote())
        if (stats["num_running"] == stats["open_requests"] == stats["streams"] == 0
                and stats["num_free_blocks"] == stats["num_blocks"]):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def _wait_idle(service, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(service.stats.remote())
        if (stats["num_running"] == stats["open_requests"] == stats["streams"] == 0
                and stats["num_free_blocks"] == stats["num_blocks"]):
            return stats
        assert time.monotonic() < deadline, f"a request still runs: {stats}"
        time.sleep(0.2)


async def _read_beside(unread: MuxedRequestStream, stream: MuxedRequestStream,
                       sample=lambda: 0) -> tuple[list[int], int]:
    """Read ``stream`` to its end, ``unread`` once (it is admitted) and then no more; the
    tokens read and the most ``sample()`` said meanwhile."""
    await unread.__anext__()
    tokens, peak = [], 0
    async for event in stream:
        peak = max(peak, sample())
        if event["type"] == "delta":
            tokens += event["token_ids"]
    return tokens, peak


def test_a_stream_nobody_reads_is_dropped_alone(service):
    """The default bound (deployment.stream_buffer_bytes, 1 MiB): 20 logprobs a token are about
    1 KB of events, so the unread stream passes it near its 1000th token, long before its
    3000, while the stream beside it, read, gets all of its 1500."""
    heavy = {"logprobs": 20}

    async def run():
        unread = MuxedRequestStream(service, prompt_token_ids=PROMPTS[0],
                                    params=_params(3000) | heavy, final_logprobs=False)
        read = MuxedRequestStream(service, prompt_token_ids=PROMPTS[1],
                                  params=_params(1500) | heavy, final_logprobs=False)
        tokens, _ = await _read_beside(unread, read)
        later, error = [], None
        try:
            async for event in unread:  # what waited for it
                later.append(event)
        except ServiceError as exc:
            error = exc
        return tokens, later, error

    tokens, later, error = asyncio.run(run())
    assert len(tokens) == 1500
    waited = sum(len(e.get("token_ids") or []) for e in later)
    assert error is not None and "dropped" in str(error), (
        f"the unread stream was not dropped: {len(later)} events ({waited} tokens) waited "
        f"for it, then {error!r}")
    assert later == [], "the dropped stream's waiting events were freed"
    _wait_idle(service)  # its request was aborted: nothing runs, every block is free


def test_an_unread_backlog_stays_under_its_bound(service):
    """A small bound: the unread stream's waiting events never pass it (and a batch, the
    largest one the bound lets through), and it is dropped long before its 3000 tokens."""
    limit = 16 << 10
    params = _params(3000) | {"logprobs": 5}

    async def run():
        unread = MuxedRequestStream(service, prompt_token_ids=PROMPTS[2], params=params,
                                    final_logprobs=False, buffer_bytes=limit)
        read = MuxedRequestStream(service, prompt_token_ids=PROMPTS[3], params=_params(400),
                                  final_logprobs=False, buffer_bytes=limit)
        tokens, peak = await _read_beside(unread, read, lambda: unread.buffered_bytes)
        with pytest.raises(ServiceError, match="dropped"):
            await unread.__anext__()
        return tokens, peak, unread._queue.burst

    tokens, peak, burst = asyncio.run(run())
    assert len(tokens) == 400
    assert 0 < peak <= max(limit, 2 * burst) and burst < limit // 4, (peak, burst)
    _wait_idle(service)

