"""The engine service through client handles, on a tiny checkpoint.

Backpressure: control calls (health, stats) answer while every stream slot is taken and the
engine thread is stuck in a step, and a request past ``deployment.max_open_requests`` is
refused at once with EngineUnavailable (HTTP 503 with Retry-After) instead of queueing; the
held requests then finish whole. Streams: every choice of an n > 1 request streams to its
end, and a caller that leaves leaves nothing behind in the service."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.contract.config import EngineConfig
from cluster.contract.errors import EngineUnavailable
from cluster.serving.client import Handle
from cluster.serving.service import get_or_start_service, stop_service
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

NAME = "backpressure"
BOUND = 3
TOKENS = 8


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("backpressure"), seed=2)
    config = EngineConfig().with_overrides(dtype="float32", 
        model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5, block_size=4,
        kv_cache_bytes=1 << 22, name=NAME, namespace=NAME, max_open_requests=BOUND)
    actor = get_or_start_service(config)
    wait_ready(actor, timeout=120)
    yield Handle(actor)
    stop_service(NAME, NAME)


def _prompt(i: int) -> list[int]:
    return [(5 * i + j) % 150 + 1 for j in range(6 + i)]


def test_control_calls_answer_and_the_request_past_the_bound_is_refused(service):
    expected = [service.generate(prompt_token_ids=_prompt(i), max_tokens=TOKENS, temperature=0,
                                 ignore_eos=True).token_ids for i in range(BOUND)]
    chaos.hang_worker(f"{NAME}-worker-0-0", namespace=NAME, seconds=6)  # the next step stalls
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = service.generate(prompt_token_ids=_prompt(i), max_tokens=TOKENS,
                                      temperature=0, ignore_eos=True).token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BOUND)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while service.stats()["open_requests"] < BOUND:  # stats answers while streams are held
        assert time.monotonic() < deadline, service.stats()
        time.sleep(0.1)
    assert service.health()["status"] == "ready"
    with pytest.raises(EngineUnavailable, match="max_open_requests=3"):
        service.generate(prompt_token_ids=_prompt(9), max_tokens=TOKENS)
    assert not results  # the refusal came while every held request was still open
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(BOUND)] == expected  # the held requests finished whole
    assert service.stats()["open_requests"] == 0
    assert len(service.generate(prompt_token_ids=_prompt(0), max_tokens=2).token_ids) == 2


def test_every_choice_streams_to_its_end_when_they_finish_together(service):
    """n=2, greedy: both choices end in the same step; each one's deltas carry all its tokens
    and its finish reason."""
    with service.request(prompt_token_ids=_prompt(1), n=2, max_tokens=TOKENS, temperature=0,
                         ignore_eos=True) as stream:
        events = list(stream)
    final = events[-1]
    assert final["type"] == "final" and len(final["outputs"]) == 2
    for index in (0, 1):
        deltas = [e for e in events[:-1] if e["index"] == index]
        assert [t for e in deltas for t in e["token_ids"]] == final["outputs"][index]["token_ids"]
        assert len(final["outputs"][index]["token_ids"]) == TOKENS
        assert deltas[-1]["finish_reason"] == "length"


def test_a_caller_that_leaves_leaves_nothing_behind(service):
    """Cancelled mid-request (its step held by a hung worker, so it cannot finish first): the
    request is aborted, its KV blocks freed, and its stream forgotten by the service."""
    before = service.stats()
    chaos.hang_worker(f"{NAME}-worker-0-0", namespace=NAME, seconds=3)
    stream = service.request(prompt_token_ids=_prompt(2), max_tokens=200, temperature=0,
                             ignore_eos=True)
    deadline = time.monotonic() + 60
    while service.stats()["streams"] < 1:  # admitted: its first step is on the hung worker
        assert time.monotonic() < deadline, service.stats()
        time.sleep(0.1)
    stream.cancel()
    while True:
        stats = service.stats()
        if stats["streams"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["num_free_blocks"] == before["num_free_blocks"] == stats["num_blocks"]


def test_a_stream_that_reads_deltas_leaves_no_logprobs_in_the_engine(service):
    """``final_logprobs=False`` (the HTTP API's streams): every token's logprobs arrive in its
    delta, and the engine keeps none for the final event (memory bounded by a step, not by
    n x output length x top-n); the default keeps them for the final event."""
    from cluster.serving.stream import RequestStream

    sampling = dict(n=2, max_tokens=TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    lean = list(RequestStream(service.actor, prompt_token_ids=_prompt(3), params=sampling,
                              final_logprobs=False))
    full = list(RequestStream(service.actor, prompt_token_ids=_prompt(3), params=sampling))
    for events in (lean, full):
        deltas = [e for e in events if e["type"] == "delta"]
        for index in (0, 1):
            mine = [e for e in deltas if e["index"] == index]
            entries = [lp for e in mine for lp in e["logprobs"]]
            assert [lp["token_id"] for lp in entries] == [t for e in mine for t in e["token_ids"]]
            assert len(entries) == TOKENS
    assert all(o["logprobs"] is None for o in lean[-1]["outputs"])
    assert [len(o["logprobs"]) for o in full[-1]["outputs"]] == [TOKENS, TOKENS]
    assert [o["token_ids"] for o in lean[-1]["outputs"]] == [o["token_ids"] for o in full[-1]["outputs"]]
