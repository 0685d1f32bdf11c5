"""The engine cannot be lost: SIGKILL of the engine service actor's process mid-generation
(``shardlm chaos kill-engine``) costs a pause, never a request.

16 streams (greedy, one seeded) run through client handles; at a random moment of each trial the engine
actor is killed. Ray restarts the actor, which starts a new engine (and a new worker gang);
each RequestStream resumes its request there from its journal; in the other trial a worker
is killed, and the engine replays the requests into a new gang. In each weight format
(float32, bfloat16, int8), in deterministic mode, float32's engine speculating (n-gram guesses: the tokens are still
those of one at a time, and a replay's too). Every stream must receive
exactly the tokens of a run without the failure, none twice and none missing, and the same
text: the tiny model speaks through SmolLM2's byte-level tokenizer, whose byte tokens make
characters of two bytes (and lone bytes, U+FFFD) that a kill can cut in the middle. The
service must say ready again by itself. The reference is the same requests on the same
service before any failure (greedy decoding is a pure function of the prompt).

A resume is also sent directly, as RequestStream sends one (``resume``: per choice, the
tokens its caller has): cut inside a character, and with every choice already ended."""

from __future__ import annotations

import queue
import random
import shutil
import threading
import time

import pytest
import ray

from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model
from cluster.contract import events
from cluster.contract.config import EngineConfig
from cluster.serving.client import Handle
from cluster.serving.service import get_or_start_service, stop_service
from cluster.tools import chaos
from tests.checkpoints import write_tiny_checkpoint
from tests.services import wait_ready

NAME = "restart"
STREAMS = 16
TOKENS = 120  # with the prompts, up to 155 of the tiny model's 256 positions


def _start(tmp_path_factory, name: str, shape: dict | None = None, **precision):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp(name), seed=3, **(shape or {}))
    # SmolLM2's tokenizer: the tiny vocabulary (151 ids) is its special tokens, printable
    # ASCII, the continuation bytes 0xA1-0xBF and the lead bytes 0xC2-0xCB, so the output
    # has text, and characters spread over two tokens
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model(DEFAULT_MODEL) / file, tiny / file)
    config = EngineConfig().with_overrides(
        model=str(tiny), tensor_parallel_size=1, cpus_per_worker=0.5, block_size=4,
        kv_cache_bytes=1 << 22, name=name, namespace=name, **precision)
    actor = get_or_start_service(config)
    wait_ready(actor)
    return Handle(actor)


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    yield _start(tmp_path_factory, NAME, dtype="float32")
    stop_service(NAME, NAME)


# (dtype, quantization, speculative decoding) of each weight format, in deterministic mode: a
# replay recomputes the generated tokens as a prompt, and the kernels give them the logits
# their decode steps had
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
FORMATS = {"float32": ("float32", None, NGRAM), "bfloat16": ("bfloat16", None, None),
           "int8": ("bfloat16", "int8", None)}


@pytest.fixture(scope="module", params=list(FORMATS))
def deterministic(request, ray_session, tmp_path_factory):
    dtype, quantization, speculative = FORMATS[request.param]
    name = f"{NAME}-{request.param}"
    # 9 heads of 16, the decode kernel's smallest (deterministic attention is that kernel's),
    # and widths the bf16 and int8 kernels take (the tiny model's own 72 and 97 would leave
    # its matmuls in float32)
    shape = {"hidden_size": 144, "intermediate_size": 128}
    yield name, _start(tmp_path_factory, name, shape, dtype=dtype, quantization=quantization,
                       deterministic=True, speculative_config=speculative)
    stop_service(name, name)


def _prompt(i: int) -> list[int]:
    return [(7 * i + 3 * j) % 150 + 1 for j in range(5 + 2 * i)]


def _sampling(i: int) -> dict:
    """Greedy; stream 0 with logprobs, stream 1 seeded random sampling (a pure function of
    seed and position, so it too must come out unchanged)."""
    if i == 1:
        return dict(max_tokens=TOKENS, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    extra = {"logprobs": 2} if i == 0 else {}
    return dict(max_tokens=TOKENS, temperature=0, ignore_eos=True, **extra)


def test_killing_the_engine_or_a_worker_loses_no_request(deterministic):
    name, service = deterministic
    expected = [service.generate(prompt_token_ids=_prompt(i), **_sampling(i))
                for i in range(STREAMS)]
    assert all(want.text for want in expected)  # there is text to compare
    rng = random.Random(5)
    for trial, victim in enumerate(("engine", "worker")):
        received: dict[int, list[int]] = {i: [] for i in range(STREAMS)}
        texts: dict[int, str] = {i: "" for i in range(STREAMS)}
        finals: dict[int, dict] = {}
        resumed: dict[int, dict] = {}
        errors: list[BaseException] = []
        counted = threading.Semaphore(0)

        def one(i: int) -> None:
            try:
                with service.request(prompt_token_ids=_prompt(i), **_sampling(i)) as stream:
                    for event in stream:
                        if event["type"] == "delta":
                            received[i] += event["token_ids"]
                            texts[i] += event["text"]
                            for _ in event["token_ids"]:
                                counted.release()
                        else:
                            finals[i] = event
                    resumed[i] = stream.last_resume
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        kill_after = rng.randrange(1, STREAMS * TOKENS // 4)  # tokens streamed before the kill
        for _ in range(kill_after):
            assert counted.acquire(timeout=120)
        if victim == "engine":
            chaos.kill_engine(name, name)
        else:
            chaos.kill_worker(chaos.worker_names(name, name)[0], name)
        killed = time.monotonic()
        back = wait_ready(service.actor)
        for t in threads:
            t.join(300)
        assert not errors, errors
        for i, want in enumerate(expected):
            got = finals[i]["outputs"][0]
            assert received[i] == want.token_ids, (trial, i, kill_after)  # none twice or missing
            assert texts[i] == want.text, (trial, i, kill_after)  # no text twice or missing
            assert got["token_ids"] == want.token_ids and got["finish_reason"] == "length"
            assert got["text"] == want.text
        # the journal keeps the logprobs sent before the kill, and those computed after it
        # are the bits of a run without it (the replay's logits are the decode steps')
        assert finals[0]["outputs"][0]["logprobs"] == expected[0].logprobs, (trial, kill_after)
        if victim == "worker":  # the engine replayed into a new gang; no stream noticed
            assert service.stats()["restarts"] == 1, service.stats()
            print(f"trial {trial}: worker killed after {kill_after} tokens; ready again (polled) "
                  f"in {back:.1f} s")
            continue
        moments = [r for r in resumed.values() if r.get("first_event")]
        assert moments  # the kill came while streams were open: they resumed
        detect = min(r["lost"] for r in moments) - killed
        ready = max(r["ready"] for r in moments) - killed
        first = min(r["first_event"] for r in moments) - killed
        print(f"trial {trial}: killed after {kill_after} tokens; {len(moments)} streams resumed; "
              f"loss seen {detect:.2f} s after the kill, engine ready {ready:.2f} s, first "
              f"resumed token {first:.2f} s; ready again (polled) in {back:.1f} s")
    assert service.health()["status"] == "ready"
    if name.endswith("float32"):  # it made guesses in the last trial
        stats = service.stats()
        print({k: v for k, v in stats.items() if k.startswith("spec")})
        assert stats["spec_num_draft_tokens"] > 0, stats


def test_a_request_that_fails_on_the_engine_thread_fails_alone(service):
    """A fault injected into one request's token processing (``EngineService.poison``) ends
    that request with a ServiceError naming it; the others, in the same steps, finish whole."""
    from cluster.contract.errors import ServiceError

    expected = [service.generate(prompt_token_ids=_prompt(i), **_sampling(i)).token_ids
                for i in range(1, 6)]
    streams = [service.request(prompt_token_ids=_prompt(i), **_sampling(i)) for i in range(1, 6)]
    poisoned = streams[2] = service.request(prompt_token_ids=_prompt(3), max_tokens=200,
                                            temperature=0, ignore_eos=True)  # still running
    first = next(poisoned)  # it is running: its next token fails
    ray.get(service.actor.poison.remote(poisoned.request_id))
    with pytest.raises(ServiceError, match="fault injected"):
        for _ in poisoned:
            pass
    for i, stream in enumerate(streams):
        if stream is not poisoned:
            assert stream.final()["outputs"][0]["token_ids"] == expected[i]
    assert first["type"] == "delta"
    assert service.health()["status"] == "ready"
    assert service.generate(prompt_token_ids=_prompt(1), **_sampling(1)).token_ids == expected[0]


def _resumed(service, request_id: str, timeout: float = 60, **fields) -> list[dict]:
    """The events of a request sent as RequestStream sends one to a replacement engine
    (``fields`` with ``resume``), read against a deadline: a request the engine never ends
    fails the test instead of hanging it."""
    body = events.encode_request(request_id=request_id, **fields)
    stream = service.actor.generate.options(num_returns="streaming").remote(body)
    got: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for ref in stream:
                got.put(events.decode(ray.get(ref)))
        except BaseException as exc:  # reported below
            got.put(exc)
        got.put(None)

    threading.Thread(target=read, daemon=True).start()
    received: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while (item := got.get(timeout=max(0.01, deadline - time.monotonic()))) is not None:
            if isinstance(item, BaseException):
                raise item
            received.append(item)
    except queue.Empty:
        ray.cancel(stream)  # frees the request
        pytest.fail(f"{request_id}: no final event within {timeout:.0f} s; received {received}")
    assert received and received[-1]["type"] == "final", received
    return received


def test_a_resume_inside_a_character_repeats_and_loses_no_text(service):
    """The stream was cut where its last token holds the first byte of a two-byte character
    (its text held back, waiting for the rest): resumed from there, the new engine streams
    exactly the rest, so the caller's text reads as that of a run without the failure."""
    params = dict(max_tokens=200, temperature=0, ignore_eos=True)  # long enough for 3 cuts
    with service.request(prompt_token_ids=_prompt(9), **params) as stream:
        deltas = [e for e in stream if e["type"] == "delta"]
    tokens = [t for d in deltas for t in d["token_ids"]]
    full = "".join(d["text"] for d in deltas)
    # cuts after a token whose text waits for the next, which completes one character
    # outside ASCII (not U+FFFD: a real character spread over the two tokens)
    cuts = [k for k in range(1, len(deltas)) if deltas[k - 1]["text"] == ""
            and len(deltas[k]["text"]) == 1 and "\x7f" < deltas[k]["text"] != "\ufffd"]
    assert len(cuts) >= 3, [d["text"] for d in deltas]  # the tokenizer splits characters
    for k in cuts[:3] + [len(deltas) // 2]:
        had = "".join(d["text"] for d in deltas[:k])
        resumed = _resumed(service, f"cut-{k}", prompt_token_ids=_prompt(9), params=params,
                           resume=[{"token_ids": tokens[:k], "finish_reason": None}])
        rest = "".join(e["text"] for e in resumed if e["type"] == "delta")
        assert [t for e in resumed[:-1] for t in e["token_ids"]] == tokens[k:], k
        assert had + rest == full, (k, had[-8:], rest[:8])
        assert resumed[-1]["outputs"][0]["text"] == full


@pytest.mark.parametrize("n", [1, 2])
def test_a_resumed_request_whose_choices_all_ended_ends_at_once(service, n):
    """Every choice had ended before the engine was lost, but the final event was lost with
    it: the new engine schedules nothing and answers at once with the final event (finish
    reasons as sent, usage counting the sent tokens), and the request's slot is free."""
    prompt = _prompt(4)
    want = service.generate(prompt_token_ids=prompt, max_tokens=6, temperature=0,
                            ignore_eos=True)
    sent = [{"token_ids": want.token_ids, "finish_reason": "length"},
            {"token_ids": want.token_ids[:3], "finish_reason": "stop"}][:n]
    opened = service.stats()["open_requests"]
    (final,) = _resumed(service, f"ended-{n}", timeout=30, prompt_token_ids=prompt,
                        params=dict(max_tokens=6, temperature=0, ignore_eos=True, n=n),
                        resume=sent)
    assert [(o["token_ids"], o["finish_reason"]) for o in final["outputs"]] == \
        [(s["token_ids"], s["finish_reason"]) for s in sent]
    assert final["outputs"][0]["text"] == want.text
    assert final["prompt_tokens"] == len(prompt)
    assert final["completion_tokens"] == sum(len(s["token_ids"]) for s in sent)
    assert service.stats()["open_requests"] == opened
