"""'failed' is not forever (docs/ARCHITECTURE.md, "Failures"): an engine service whose engine
failed to start, or whose supervisor gave up on its gang (``fault.max_restarts``), refuses
requests (EngineUnavailable: HTTP 503) and says when it tries again, then tries again by
itself (Ray does not replace a live actor, so nothing else would) and serves once a try
succeeds. Real actors and real failures: a checkpoint that is not there yet, a worker
SIGKILLed."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest
import ray

from cluster.contract.config import EngineConfig
from cluster.contract.errors import EngineUnavailable
from cluster.serving.client import Handle
from cluster.serving.http.app import PUBLIC_REASONS, _engine_health
from cluster.serving.service import get_or_start_service, stop_service
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

PROMPT = [5, 17, 42, 9, 88, 3]


def _config(model, name: str, **fault) -> EngineConfig:
    return EngineConfig().with_overrides(
        dtype="float32", model=str(model), tensor_parallel_size=1, cpus_per_worker=0.5,
        block_size=4, kv_cache_bytes=1 << 22, name=name, namespace=name, **fault)


def _wait_failed(actor, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    health = None
    while True:
        try:
            health = ray.get(actor.health.remote(), timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # being restarted by Ray
        else:
            if health["status"] == "failed":
                return health
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


def test_an_engine_that_failed_to_start_starts_by_itself_once_it_can(ray_session, tmp_path):
    """The checkpoint is not there: failed with the reason and the next try (1 s doubling to
    4 s), requests refused; the checkpoint appears and the engine is ready by itself, within
    the backoff's cap, and serves."""
    name = "heal-start"
    model = tmp_path / "arrives-later"
    actor = get_or_start_service(_config(model, name, start_backoff_s=1.0,
                                         start_backoff_max_s=4.0))
    handle = Handle(actor)
    try:
        failed = _wait_failed(actor)
        assert "engine start failed" in failed["reason"] and "no such directory" in failed["reason"]
        with pytest.raises(EngineUnavailable, match="not serving: engine start failed"):
            handle.generate(prompt_token_ids=PROMPT, max_tokens=2)
        public = asyncio.run(_engine_health(actor))  # what GET /health answers (with 503)
        time.sleep(5)  # a few failed tries: the backoff has reached its cap
        # written elsewhere and moved in at once: a try never sees half a checkpoint
        shutil.move(write_tiny_checkpoint("llama-gqa", tmp_path / "writing", seed=2), model)
        written = time.monotonic()
        wait_ready(actor, timeout=120)  # today's code: failed forever
        # the next try came within the cap (4 s), plus the start itself
        assert time.monotonic() - written < 4 + 60
        assert len(handle.generate(prompt_token_ids=PROMPT, max_tokens=4,
                                   ignore_eos=True).token_ids) == 4
        # /health said failed with its fixed public reason and when the next try was, no
        # internals (no path, no exception text)
        assert public["status"] == "failed" and public["reason"] == PUBLIC_REASONS["failed"]
        assert 0 <= public["retry_in_s"] <= 4
        assert failed["retry_in_s"] <= 4
    finally:
        stop_service(name, name)


def test_an_engine_that_gave_up_starts_a_new_gang_after_the_window(ray_session, tmp_path):
    """``fault.max_restarts=0``: the first dead worker makes the supervisor give up, and
    requests are refused with the reason; once ``fault.restart_window_s`` has passed, a new
    engine and gang start by themselves and serve."""
    name = "heal-budget"
    window = 8.0
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path / "tiny", seed=2)
    actor = get_or_start_service(_config(tiny, name, max_restarts=0, restart_window_s=window))
    handle = Handle(actor)
    try:
        wait_ready(actor, timeout=120)
        expected = handle.generate(prompt_token_ids=PROMPT, max_tokens=4, temperature=0,
                                   ignore_eos=True).token_ids
        chaos.kill_worker(f"{name}-worker-0-0", namespace=name)
        with pytest.raises(Exception, match="giving up: 0 worker restarts"):
            handle.generate(prompt_token_ids=PROMPT, max_tokens=4)  # its step finds the death
        gave_up = time.monotonic()
        failed = ray.get(actor.health.remote(), timeout=10)
        assert failed["status"] == "failed" and "giving up" in failed["reason"], failed
        with pytest.raises(EngineUnavailable, match="not serving: giving up"):
            handle.generate(prompt_token_ids=PROMPT, max_tokens=2)
        wait_ready(actor, timeout=window + 120)  # today's code: failed forever
        assert time.monotonic() - gave_up >= window - 1  # not before the window had passed
        assert 0 < failed["retry_in_s"] <= window
        assert handle.generate(prompt_token_ids=PROMPT, max_tokens=4, temperature=0,
                               ignore_eos=True).token_ids == expected
    finally:
        stop_service(name, name)


def test_a_stream_waits_while_the_lost_engines_replacement_fails_to_start(ray_session, tmp_path):
    """The engine actor is killed mid-stream and its replacement cannot start (the checkpoint
    is away): it says failed with its next try, and the stream waits for it instead of giving
    up; the checkpoint is back, the replacement starts, and the stream resumes there with
    exactly the tokens of a run without the failure."""
    name = "heal-resume"
    model = write_tiny_checkpoint("llama-gqa", tmp_path / "tiny", seed=2)
    actor = get_or_start_service(_config(model, name, start_backoff_s=1.0,
                                         start_backoff_max_s=2.0))
    handle = Handle(actor)
    sampling = dict(prompt_token_ids=PROMPT, max_tokens=200, temperature=0, ignore_eos=True)
    try:
        wait_ready(actor, timeout=120)
        expected = handle.generate(**sampling).token_ids
        received, errors, started = [], [], threading.Event()

        def one() -> None:
            try:
                with handle.request(**sampling) as stream:
                    for event in stream:
                        if event["type"] == "delta":
                            received.extend(event["token_ids"])
                            started.set()
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=one)
        thread.start()
        assert started.wait(120)
        away = shutil.move(model, tmp_path / "away")
        chaos.kill_engine(name, name)
        failed = _wait_failed(actor)  # the replacement's start failed
        assert "retry_in_s" in failed, failed
        time.sleep(3)  # the stream has seen it failed (it polls health every fraction of a s)
        assert thread.is_alive() and not errors, errors  # today's code: it gave up
        shutil.move(away, model)
        wait_ready(actor, timeout=120)
        thread.join(120)
        assert not errors, errors
        assert received == expected  # none twice, none missing
    finally:
        stop_service(name, name)
