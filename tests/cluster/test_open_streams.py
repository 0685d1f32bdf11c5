"""1000 streams held open on one engine (its next step stalls on a hung worker, so none can
finish): the control calls still answer within a second (their own concurrency group), and
request 1001, past ``deployment.max_open_requests``, is refused at once with
EngineUnavailable (HTTP 503 with Retry-After) instead of waiting."""

from __future__ import annotations

import time

import pytest

from cluster.contract.config import EngineConfig
from cluster.contract.errors import EngineUnavailable
from cluster.serving.client import Handle
from cluster.serving.service import get_or_start_service, stop_service
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

NAME = "open-streams"
BOUND = 1000


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("open"), seed=5)
    config = EngineConfig().with_overrides(dtype="float32", 
        model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5, block_size=4,
        kv_cache_bytes=1 << 22, name=NAME, namespace=NAME, max_open_requests=BOUND)
    actor = get_or_start_service(config)
    wait_ready(actor, timeout=120)
    yield Handle(actor)
    stop_service(NAME, NAME)


def test_a_thousand_open_streams_starve_no_control_call(service):
    chaos.hang_worker(f"{NAME}-worker-0-0", namespace=NAME, seconds=45)
    streams = [service.request(prompt_token_ids=[1 + i % 100, 2, 3], max_tokens=4)
               for i in range(BOUND)]
    deadline = time.monotonic() + 90
    while (opened := service.stats()["open_requests"]) < BOUND:
        assert time.monotonic() < deadline, opened
        time.sleep(0.2)
    slowest = 0.0
    for _ in range(5):
        started = time.monotonic()
        assert service.health()["status"] == "ready"
        slowest = max(slowest, time.monotonic() - started)
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match=f"max_open_requests={BOUND}"):
        service.generate(prompt_token_ids=[5, 6, 7], max_tokens=4)
    refused_in = time.monotonic() - started
    print(f"{BOUND} open streams: health answered in at most {slowest * 1000:.0f} ms; "
          f"request {BOUND + 1} refused in {refused_in * 1000:.0f} ms")
    assert slowest < 1.0 and refused_in < 1.0
    for stream in streams:
        stream.cancel()
