"""Requests built to hurt the service hurt only themselves (issue 35, items 1 and 2).

A real API (Ray Serve app, engine service, one worker, the default model) whose grammars
may take ``scheduler.grammar_compile_timeout_s: 1`` to compile. While one stream runs:

- a JSON schema whose properties each hold a different long pattern (each compiles on its
  own, for seconds) is refused with a 400 naming the limit, and the running stream's
  longest gap between two tokens stays under 2 s (before: the grammar was compiled on the
  sampling worker inside a step, and every stream waited for it: gaps of the whole compile
  time, and past ``fault.step_timeout_s`` a rebuilt gang replaying the same compile);
- the same request sent again once its compile has finished in the background (the library
  cannot be interrupted, so the work is kept) is answered, with JSON that follows it;
- ``logit_bias`` and ``allowed_token_ids`` past their bounds are 400s naming the field.
"""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
import requests

from cluster.checkpoints.store import DEFAULT_MODEL
from cluster.contract.sampling import MAX_ALLOWED_TOKEN_IDS, MAX_LOGIT_BIAS
from tests.api_server import API_KEY, error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "hostile-requests"
LIMIT_S = 1.0
# eight string properties, each with its own pattern, so that no compiled rule is shared
SLOW_SCHEMA = {"type": "object", "required": [f"p{i}" for i in range(8)],
               "properties": {f"p{i}": {"type": "string", "pattern": f"^[^\\n\\r]{{1,{100 + i}}}$"}
                              for i in range(8)}}


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME, tensor_parallel_size=1, grammar_compile_timeout_s=LIMIT_S) as server:
        yield server


def _stream_times(server, max_tokens: int, times: list, errors: list) -> None:
    """Stream a long completion, appending each chunk's arrival time."""
    try:
        with requests.post(server.base + "/v1/completions", stream=True, timeout=300,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": DEFAULT_MODEL, "prompt": "Count to one thousand:",
                                 "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    times.append(time.monotonic())
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _constrained(server, schema: dict) -> requests.Response:
    return server.post("/v1/chat/completions", {
        "model": DEFAULT_MODEL, "max_tokens": 120, "temperature": 0,
        "messages": [{"role": "user", "content": "Fill in eight short fields as JSON."}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "fields", "schema": schema}}})


def test_a_slow_grammar_is_refused_and_stalls_no_other_stream(server):
    times, errors = [], []
    reader = threading.Thread(target=_stream_times, args=(server, 300, times, errors))
    reader.start()
    deadline = time.monotonic() + 120
    while len(times) < 5 and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(times) >= 5, errors
    asked = time.monotonic()
    refused = _constrained(server, SLOW_SCHEMA)
    answered_in = time.monotonic() - asked
    reader.join(timeout=300)
    assert not errors, errors
    error = error_of(refused, 400, "structured_outputs")
    assert "grammar_compile_timeout_s" in error["message"], error
    assert answered_in < LIMIT_S + 10, answered_in
    during = [b - a for a, b in zip(times, times[1:]) if b >= asked]
    assert during and len(times) >= 250, len(times)  # a chunk may carry several tokens
    print(f"the grammar refused after {answered_in:.2f} s; the other stream's longest gap "
          f"meanwhile {max(during):.3f} s")
    assert max(during) < 2.0, f"the stream waited {max(during):.2f} s for the grammar"

    # the compile went on in the background and was kept: the same schema is served now
    deadline = time.monotonic() + 240
    while True:
        answer = _constrained(server, SLOW_SCHEMA)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        error_of(answer, 400, "structured_outputs")
        time.sleep(2)
    assert answer.status_code == 200, answer.text
    text = answer.json()["choices"][0]["message"]["content"]
    if answer.json()["choices"][0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(text), SLOW_SCHEMA)
    else:  # cut by max_tokens: every character so far is a prefix the schema allows
        assert text.startswith("{"), text


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
    ("allowed_token_ids", [1] * (MAX_ALLOWED_TOKEN_IDS + 1)),
])
def test_oversized_sampling_lists_are_a_400_naming_the_field(server, field, value):
    response = server.post("/v1/completions", {"model": DEFAULT_MODEL, "prompt": "Hi",
                                               "max_tokens": 4, field: value})
    error = error_of(response, 400, field)
    assert "at most" in error["message"], error
    ok = server.post("/v1/completions", {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
