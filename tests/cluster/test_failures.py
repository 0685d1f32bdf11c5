"""A dead or hung worker costs a pause, never a request (docs/ARCHITECTURE.md, "Failures").

The engine service runs the default model at tp=2 in bfloat16, in deterministic mode (so a
replay, which recomputes the generated tokens as a prompt, gives them the logits their decode
steps had), speculating (n-gram guesses: its output is still one token at a time's, and a
replay sees only the kept guesses); callers stream through client handles (the real user path) while workers are
SIGKILLed or made to hang. Every request must complete with exactly the tokens of a run
without failures (greedy, seeded, penalized and constrained requests alike: JSON-schema and
regex outputs, which also validate)."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import pytest
import ray

from cluster.tools import chaos
from cluster.serving.client import Handle
from cluster.contract.config import EngineConfig
from cluster.serving.service import get_or_start_service, stop_service

pytestmark = pytest.mark.slow
NAME = "faults"
KILLS = 3
PROMPTS = [f"Write a short story about a robot named Unit {i}." for i in range(16)]


SONG = {"type": "object", "additionalProperties": False, "required": ["title", "year"],
        "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 24},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2030}}}
CODE = r"[A-Z]{3}-\d{4}( [a-z]{3,8}){2,6}\."


def _params(i: int) -> dict:
    if i % 4 == 2:  # a quarter constrained: their grammars rebuilt from the replayed output
        spec = ({"json": SONG, "disable_any_whitespace": True} if i % 8 == 2
                else {"regex": CODE})  # both end within 64 tokens
        return {"max_tokens": 64, "temperature": 0.7, "seed": 50 + i, "structured_outputs": spec}
    if i % 4 == 3:  # a quarter sampled with a seed: replay must continue the same random stream
        return {"max_tokens": 64, "temperature": 0.8, "top_p": 0.95, "seed": 1000 + i,
                "ignore_eos": True}
    if i % 4 == 1:  # a quarter penalized: their history and bans rebuilt from the replay
        return {"max_tokens": 64, "temperature": 0, "ignore_eos": True,
                "repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.2,
                "bad_words": ["robot", "the"], "logit_bias": {"13": 2.0}}
    return {"max_tokens": 64, "temperature": 0, "ignore_eos": True}


class Round:
    """16 concurrent streams; records what each caller received."""

    def __init__(self, handle: Handle):
        self.texts = [""] * len(PROMPTS)
        self.tokens = [0] * len(PROMPTS)
        self.done = [False] * len(PROMPTS)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._one, args=(handle, i)) for i in range(len(PROMPTS))]
        for t in self.threads:
            t.start()

    def _one(self, handle: Handle, i: int) -> None:
        try:
            with handle.request(PROMPTS[i], **_params(i)) as stream:
                for event in stream:
                    if event["type"] == "delta":
                        self.texts[i] += event["text"]
                        self.tokens[i] += len(event["token_ids"])
            self.done[i] = True
        except BaseException as exc:  # recorded, the test fails on it
            self.errors.append(exc)

    def in_flight(self) -> bool:
        return any(0 < n for n in self.tokens) and not all(self.done)

    def join(self, timeout: float = 300) -> None:
        for t in self.threads:
            t.join(timeout)


@pytest.fixture(scope="module")
def service(ray_session):
    config = EngineConfig().with_overrides(
        dtype="bfloat16", deterministic=True, tensor_parallel_size=2, cpus_per_worker=0.5,
        kv_cache_bytes=64 << 20, name=NAME, step_timeout_s=8.0, restart_backoff_s=0.5,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    actor = get_or_start_service(config)
    handle = Handle(actor)
    deadline = time.monotonic() + 300
    while handle.health()["status"] != "ready":
        assert time.monotonic() < deadline, handle.health()
        time.sleep(0.5)
    yield actor, handle
    stop_service(NAME, "shardlm")


def _valid(i: int, text: str) -> bool:
    """A constrained request's output follows its grammar (jsonschema, re)."""
    import jsonschema

    if i % 8 == 2:
        jsonschema.validate(json.loads(text), SONG)
        return True
    return re.fullmatch(CODE, text) is not None


@pytest.fixture(scope="module")
def reference(service):
    first = Round(service[1])
    first.join()
    assert not first.errors and all(first.done)
    for i, n in enumerate(first.tokens):  # the constrained ones end with their grammar
        assert n == 64 if i % 4 != 2 else 0 < n < 64, (i, n, first.texts[i])
    assert all(_valid(i, first.texts[i]) for i in range(2, len(PROMPTS), 4))
    return first


def _wait_in_flight(run: Round, min_wait: float) -> None:
    time.sleep(min_wait)
    deadline = time.monotonic() + 60
    while not run.in_flight():
        assert time.monotonic() < deadline, "the requests never started streaming"
        time.sleep(0.05)


def test_sigkills_at_random_moments_lose_nothing(service, reference):
    actor, handle = service
    rng = random.Random(7)
    restarts_before = handle.stats()["restarts"] if "restarts" in handle.stats() else 0
    for kill in range(KILLS):
        run = Round(handle)
        _wait_in_flight(run, rng.uniform(0.2, 2.0))
        victim = rng.choice(chaos.worker_names(NAME, tp=2))
        chaos.kill_worker(victim)
        run.join()
        assert not run.errors, run.errors
        assert all(run.done)
        assert run.tokens == reference.tokens, f"kill {kill}: token counts {run.tokens}"
        assert run.texts == reference.texts, f"kill {kill} of {victim} changed an output"
    stats = handle.stats()
    assert stats["restarts"] - restarts_before == KILLS
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0, stats
    timings = ray.get(actor.recovery.remote())
    print("last recovery:", {k: round(v, 2) for k, v in timings.items()})


def test_a_hung_worker_is_caught_by_the_step_deadline(service, reference):
    actor, handle = service
    restarts_before = handle.stats()["restarts"]
    incarnation = handle.health()["incarnation"]
    run = Round(handle)
    _wait_in_flight(run, 0.5)
    chaos.hang_worker(f"{NAME}-worker-0-1", seconds=3600)
    seen = set()
    while not all(run.done) and not run.errors:  # /health reads this while it recovers
        health = handle.health()
        seen.add(health["status"])
        if health["status"] == "recovering":
            assert "exceeded fault.step_timeout_s=8s" in health["reason"]
        time.sleep(0.2)
    run.join()
    assert "recovering" in seen
    restarts_metric = [line for line in ray.get(actor.metrics_text.remote()).splitlines()
                       if line.startswith("shardlm:worker_restarts_total")]
    assert float(restarts_metric[0].rsplit(" ", 1)[1]) >= restarts_before + 1
    assert not run.errors and all(run.done)
    assert run.texts == reference.texts
    assert handle.stats()["restarts"] == restarts_before + 1
    timings = ray.get(actor.recovery.remote())
    assert timings["detect_s"] >= 8.0  # found by the deadline, not by anything else
    # a new gang under the same engine service: its incarnation is the one before
    assert handle.health() == {"status": "ready", "reason": None, "incarnation": incarnation}
