"""An API replica's requests share one subscription to their engine service
(:class:`cluster.serving.stream.Mux`): their tokens equal transformers' greedy ones, a step's
tokens for all of them arrive together (fewer Ray items than events), and when the subscriber
goes away the service aborts its requests and frees their KV blocks."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from cluster.contract.config import EngineConfig
from cluster.serving.service import get_or_start_service, stop_service
from cluster.serving.stream import Mux, MuxedRequestStream
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
