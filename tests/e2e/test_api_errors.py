"""Errors that are not the client's fault say nothing of the server's insides over HTTP.

A real API (Ray Serve app, engine service, two workers) with ``fault.max_restarts: 0``, so
that a killed worker makes the engine give up and its requests fail with the reason, which
names the worker, its pid and its node's address (the text the operators need). Driven
with the official `openai` client: a request poisoned mid-stream (an internal error of that
request alone) and a worker SIGKILLed under a streamed and a whole completion (503s). Each
body must hold a fixed public sentence and the request id, and nothing of the detail; the
detail must be in the server's log under that id. (Before, the bodies quoted the exception:
"internal error: the engine could not process this request's token: RuntimeError: fault
injected (chaos poison)", "giving up: ...; last failure: api-errors-worker-0-1 (pid 4242 on
10.0.0.7): ActorDiedError: ...".)"""

from __future__ import annotations

import glob
import os
import re
import threading
import time

import openai
import pytest
import requests

from cluster.checkpoints.store import DEFAULT_MODEL
from tests.api_server import error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "api-errors"
CHAT = [{"role": "user", "content": "Count from one to one thousand, in words."}]
LONG = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}
# what a client must never see: Ray's remote frames and tracebacks, pids, IPv4 addresses,
# actor (worker) names, exception class names
INTERNALS = re.compile(r"ray::|Traceback|\bpid\b|pid=|\b\d{1,3}(\.\d{1,3}){3}\b|[Ww]orker|"
                       r"[A-Z]\w*Error\b|[Aa]ctor|fault injected|File \"")


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME, max_restarts=0) as server:
        yield server


def assert_public(error: dict, request_id: str, code: str) -> None:
    assert error["code"] == code, error
    assert request_id and request_id in error["message"], error
    leaked = INTERNALS.search(error["message"].replace(request_id, ""))
    assert leaked is None, f"the body leaks {leaked.group()!r}: {error}"


def logged(request_id: str, *details: str, timeout: float = 30.0) -> str:
    """The server-side log line(s) naming ``request_id``, once they hold every one of
    ``details`` (Ray writes the replicas' logs under this session's logs directory)."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    deadline, found = time.monotonic() + timeout, ""
    while True:
        found = ""
        for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
            if not os.path.isfile(path) or path.endswith((".gz", ".pid", ".sock")):
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            if request_id in text:
                found += text[text.index(request_id) - 200:text.index(request_id) + 4000]
        if found and all(d in found for d in details):
            return found
        assert time.monotonic() < deadline, (
            f"no log under {logs} names {request_id} with {details}: {found[:2000]!r}")
        time.sleep(0.5)


def test_an_internal_error_mid_stream_is_an_id_not_a_traceback(server):
    """A request that fails on the engine thread (chaos poison) while streaming: its error
    event says "internal error" and its id; the log has the exception under that id."""
    import ray

    stream = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                   stream=True, **LONG)
    first = next(iter(stream))
    ray.get(server.engine.poison.remote(first.id), timeout=60)  # the chat's engine request id
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert_public(caught.value.body, first.id, "internal_error")
    assert caught.value.body["message"].startswith("internal error"), caught.value.body
    assert stream.response.headers["x-request-id"] == first.id
    logged(first.id, "fault injected (chaos poison)")
    ok = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=4)
    assert ok.choices[0].message.content  # the engine serves on


def test_a_dead_engine_is_a_503_that_names_no_worker_pid_or_node(server):
    """SIGKILL a worker with no restarts allowed: the engine gives up, naming the worker, its
    pid and node. A whole completion in flight gets 503 and a stream an error event, each
    with the public sentence and its request id; the log has the reason, a worker's name
    included, under each id. (Last in this module: the engine is gone.)"""
    from cluster.tools import chaos

    whole: dict = {}

    def ask() -> None:
        try:
            server.client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time",
                                             **LONG)
        except openai.APIStatusError as exc:
            whole["error"] = exc

    stream = server.client.completions.create(model=DEFAULT_MODEL, prompt="Count: one, two,",
                                              stream=True, **LONG)
    first = next(iter(stream))
    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 60
    while server.stats()["num_running"] < 2:  # both admitted before the kill
        assert time.monotonic() < deadline, server.stats()
        time.sleep(0.1)
    victim = chaos.worker_names(NAME, NAME, tp=2)[1]
    chaos.kill_worker(victim, NAME)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert_public(caught.value.body, first.id, "engine_unavailable")
    asker.join(120)
    error = whole.get("error")
    assert error is not None and error.status_code == 503, whole
    assert error.request_id and error.response.headers.get("retry-after")
    assert_public(error_of(error.response, 503), error.request_id, "engine_unavailable")
    for request_id in (first.id, error.request_id):  # the victim, or a peer it left stuck
        logged(request_id, f"{NAME}-worker-0-", "giving up")
    # the engine has failed: a new request is refused with the public reason and an id
    refused = server.post("/v1/completions", {"model": DEFAULT_MODEL, "prompt": "Hi"})
    code = "engine_failed" if refused.json()["error"]["code"] == "engine_failed" \
        else "engine_unavailable"  # (admission's answer: the replica's ready check was fresh)
    assert_public(error_of(refused, 503), refused.headers["x-request-id"], code)
    health = requests.get(server.base + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "failed", health.text
    assert INTERNALS.search(health.json()["reason"]) is None, health.text
