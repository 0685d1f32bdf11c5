"""The OpenAI-compatible API over real HTTP: the Ray Serve application of cluster.serving.http.app in
front of the engine service (SmolLM2-135M-Instruct at tp=2), driven by the official `openai`
client, raw HTTP for bad inputs, and schemathesis over the app's own /openapi.json.
Greedy text is checked against `transformers.generate` on the same checkpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import openai
import pytest
import requests
import torch

from cluster.checkpoints.store import DEFAULT_MODEL
from tests.api_server import API_KEY, PROMPT, error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "openai-e2e"  # the engine service's actor name and namespace, and the Serve app name
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME) as server:
        yield server


def hf_greedy(hf, ids: list[int], max_new_tokens: int) -> str:
    tokenizer, model = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_requests_while_the_engine_starts_get_503(server):
    if not server.while_starting:
        pytest.skip("the engine was ready before the first probe")
    for response in server.while_starting:  # 200 only if it became ready in between
        if response.status_code != 200:
            assert error_of(response, 503)["code"] == "engine_starting"
            assert response.headers["retry-after"]


# ---- happy paths with the official client ----------------------------------------------------
def test_health_and_models(server):
    assert requests.get(server.base + "/health", timeout=30).json()["status"] == "ready"
    models = server.client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL]
    assert server.client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


def test_greedy_completion_matches_transformers(server, hf):
    out = server.client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24,
                                           temperature=0)
    assert out.object == "text_completion" and out.model == DEFAULT_MODEL
    ids = hf[0](PROMPT).input_ids
    assert out.choices[0].text == hf_greedy(hf, ids, 24)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(server.client.completions.create(
        model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason


def test_greedy_chat_matches_transformers(server, hf):
    out = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                max_completion_tokens=16, temperature=0)
    tokenizer = hf[0]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == hf_greedy(hf, ids, 16)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.prompt_tokens == len(ids)

    stream = server.client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CHAT, max_completion_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        out.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_max_tokens_stop_and_several_prompts(server):
    out = server.client.completions.create(model=DEFAULT_MODEL, prompt=[PROMPT, "1, 2, 3,"],
                                           max_tokens=5, temperature=0, n=2,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 4 * 5
    assert out.choices[0].text == out.choices[1].text  # greedy: n copies agree

    full = server.client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24,
                                            temperature=0).choices[0].text
    stop = full.strip().split()[2]
    cut = server.client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24,
                                           temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_seed_reproduces_sampled_text(server):
    def sample(seed):
        return server.client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time",
                                                max_tokens=16, temperature=0.8, seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    chat = [server.client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CHAT, max_tokens=12, temperature=0.8, seed=7).choices[0]
        .message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_logprobs(server):
    out = server.client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=6,
                                           temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and logprob <= 0
        assert logprob == pytest.approx(max(top.values()))  # greedy took the most likely token

    chat = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_64_concurrent_streams_complete_and_free_every_block(server):
    async def one(client, i):
        stream = await client.completions.create(
            model=DEFAULT_MODEL, prompt=f"Story number {i}:", max_tokens=8, temperature=0.7, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=600) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run_all())
    assert len(results) == 64
    assert all(usage.completion_tokens == 8 for _, usage in results)
    stats = server.wait_idle()
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_disconnected_stream_is_aborted(server):
    stream = server.client.completions.create(
        model=DEFAULT_MODEL, prompt="Count slowly:", max_tokens=1500, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert server.stats()["num_running"] == 1
    stream.response.close()
    stats = server.wait_idle(timeout=30)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Count slowly:"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count slowly."}]}),
])
def test_a_disconnected_non_streaming_request_is_aborted(server, path, body):
    """A client that gives up waiting for a non-streaming answer (closes its connection) has
    its request aborted at once, as a streaming client has: its KV blocks freed and its slot
    among the engine's open requests given back, not held until max_tokens are made."""
    max_tokens = 1500
    before = server.stats()
    payload = json.dumps({"model": DEFAULT_MODEL, "max_tokens": max_tokens, "temperature": 0,
                          "ignore_eos": True, "stream": False, **body}).encode()
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    # a raw socket: closing it is a plain disconnect, with no client library in between
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        deadline = time.monotonic() + 60
        while server.stats()["num_running"] != 1:
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.1)
        time.sleep(1)  # decoding
    stats = server.wait_idle(timeout=10)  # all 1500 tokens take about 40 s on 2 cores
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"], stats
    assert stats["open_requests"] == 0, stats
    generated = stats["generation_tokens"] - before["generation_tokens"]
    assert 0 < generated < max_tokens, f"{generated} tokens: it ran to the end, not aborted"


def test_metrics_move_after_requests(server):
    prompt_before = server.metric("shardlm:prompt_tokens_total")
    gen_before = server.metric("shardlm:generation_tokens_total")
    server.client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=3,
                                     extra_body={"ignore_eos": True})
    assert server.metric("shardlm:prompt_tokens_total") > prompt_before
    assert server.metric("shardlm:generation_tokens_total") >= gen_before + 3
    response = requests.get(server.base + "/metrics", timeout=30)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")


# ---- bad inputs: OpenAI-shaped errors with the right status, and the server keeps serving -----
def _body(**overrides) -> dict:
    return {"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2, **overrides}


def test_bad_inputs_get_openai_errors(server):
    error_of(server.post("/v1/completions", '{"model": "x", "prompt": '), 400)
    assert error_of(server.post("/v1/completions", _body(max_tokens="ten")), 400, "max_tokens")
    assert error_of(server.post("/v1/completions", _body(prompt={"a": 1})), 400, "prompt")
    assert "wat" in error_of(server.post("/v1/completions", _body(wat=1)), 400, "wat")["message"]
    assert error_of(server.post("/v1/completions", _body(model="gpt-4")), 404,
                  "model")["code"] == "model_not_found"
    error_of(server.post("/v1/completions", _body(max_tokens=-1)), 400, "max_tokens")
    error_of(server.post("/v1/completions", _body(temperature=5)), 400, "temperature")
    error_of(server.post("/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": []}), 400,
           "messages")
    error_of(server.post("/v1/completions", b'{"model": "\xff\xfe", "prompt": "a"}',
                       headers={"Content-Type": "application/json"}), 400)
    error_of(server.post("/v1/completions", "[1, 2]"), 400)
    error_of(server.post("/v1/completions", b'{"model": "a", "prompt": "' + b"x" * (10 << 20) + b'"}'),
           413)

    max_len = server.client.models.list().data[0].model_extra["max_model_len"]
    long = server.post("/v1/completions", _body(prompt=" hello" * (max_len + 10)))
    assert error_of(long, 400, "prompt")["code"] == "context_length_exceeded"
    assert "the prompt has" in long.json()["error"]["message"]
    long_stream = server.post("/v1/completions", _body(prompt=" hello" * (max_len + 10), stream=True))
    error_of(long_stream, 400, "prompt")

    error_of(server.post("/v1/completions", _body(), key=None), 401)
    error_of(server.post("/v1/completions", _body(), key="sk-wrong"), 401)
    assert requests.get(server.base + "/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong", max_retries=0).models.list()

    ok = server.post("/v1/completions", _body())
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    # vLLM's benchmark client sends repetition_penalty 1.0 (no penalty) with every request
    assert server.post("/v1/completions", _body(repetition_penalty=1.0)).status_code == 200
    assert server.post("/v1/completions", _body(repetition_penalty=1.2, frequency_penalty=0.5,
                                                presence_penalty=-0.5, logit_bias={"11": 3},
                                                min_tokens=1)).status_code == 200
    error_of(server.post("/v1/completions", _body(repetition_penalty=0)), 400, "repetition_penalty")
    error_of(server.post("/v1/completions", _body(logit_bias={"11": 200})), 400, "logit_bias")
    error_of(server.post("/v1/completions", _body(logit_bias={"99999999": 1})), 400, "logit_bias")
    error_of(server.post("/v1/completions", _body(min_tokens=5, max_tokens=2)), 400, "min_tokens")
    only = server.post("/v1/completions", _body(allowed_token_ids=[28, 29], bad_words=["Paris"],
                                                max_tokens=3, temperature=0))
    assert only.status_code == 200, only.text
    error_of(server.post("/v1/completions", _body(allowed_token_ids=[])), 400, "allowed_token_ids")
    error_of(server.post("/v1/completions", _body(allowed_token_ids=[10 ** 8])), 400,
             "allowed_token_ids")
    error_of(server.post("/v1/completions", _body(bad_words=[""])), 400, "bad_words")


def test_text_that_is_not_unicode_is_a_400(server):
    """A lone surrogate ("\\ud800" in the JSON) is valid JSON but not Unicode text: 400 naming
    the field, and the server goes on serving (it was a 500)."""
    JSON = {"Content-Type": "application/json"}
    chat = ('{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800"}]}'
            % DEFAULT_MODEL)
    assert "Unicode" in error_of(server.post("/v1/chat/completions", chat, headers=JSON), 400, "messages")["message"]
    prompt = '{"model": "%s", "max_tokens": 2, "prompt": "a\\udfff b"}' % DEFAULT_MODEL
    error_of(server.post("/v1/completions", prompt, headers=JSON), 400, "prompt")
    stop = '{"model": "%s", "max_tokens": 2, "prompt": "a", "stop": ["\\ud800"]}' % DEFAULT_MODEL
    error_of(server.post("/v1/completions", stop, headers=JSON), 400, "stop")
    streamed = chat.replace('"max_tokens": 2', '"max_tokens": 2, "stream": true')
    error_of(server.post("/v1/chat/completions", streamed, headers=JSON), 400, "messages")
    ok = server.post("/v1/completions", _body())
    assert ok.status_code == 200, ok.text


def test_max_tokens_past_the_context_is_a_400(server):
    """As OpenAI and vLLM answer: 400 naming both numbers, not a reply cut at the context."""
    max_len = server.client.models.list().data[0].model_extra["max_model_len"]
    error = error_of(server.post("/v1/completions", _body(max_tokens=10 ** 9)), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert "max_tokens is 1000000000" in error["message"] and str(max_len) in error["message"]
    chat = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": max_len}
    assert error_of(server.post("/v1/chat/completions", chat), 400, "max_tokens")["code"] == (
        "context_length_exceeded")


def test_openapi_describes_every_route(server):
    spec = requests.get(server.base + "/openapi.json", timeout=30).json()
    paths = spec["paths"]
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"),
                         ("/v1/models", "get"), ("/health", "get"), ("/metrics", "get")]:
        assert method in paths[path], path
    body = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/CompletionRequest")
    responses = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(responses)
    assert "text/event-stream" in responses["200"]["content"]


def test_schemathesis_finds_no_server_errors(server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    seen: dict[str, int] = {}

    def small(case) -> None:  # keep generations short: this checks handling, not the model
        body = case.body
        if isinstance(body, dict):
            for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                value = body.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    body[key] = max(-1, min(int(value), 2))
            unbounded = body.get("max_tokens") is None and body.get("max_completion_tokens") is None
            if "messages" in body and unbounded:  # the chat default: the whole context
                body["max_completion_tokens"] = 2
            if "input" in body and body.get("max_output_tokens") is None:  # the same (responses)
                body["max_output_tokens"] = 2

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST" or "{" in operation.path:  # something to break
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                small(case)
                response = case.call(base_url=server.base, headers=headers, timeout=120)
                label = f"{case.method} {case.path} {response.status_code}"
                seen[label] = seen.get(label, 0) + 1
                assert response.status_code < 500, f"{label}: {response.text[:500]} for {case.body!r}"
                case.validate_response(response, checks=[
                    checks.status_code_conformance, checks.content_type_conformance,
                    checks.response_schema_conformance])

            check()
    # both accepted and refused cases
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                 "/v1/responses"):
        assert seen.get(f"POST {path} 200") and seen.get(f"POST {path} 400"), seen
    ok = server.post("/v1/completions", _body())
    assert ok.status_code == 200, ok.text
    assert server.wait_idle()["num_free_blocks"] == server.stats()["num_blocks"]


def test_a_stream_outlives_the_engine_and_health_comes_back_by_itself(server):
    """SIGKILL the engine actor (shardlm chaos kill-engine) while an HTTP stream is open: the
    stream goes on with the same text as a run without the failure, /health says recovering
    with a short public reason (no pid, address or trace), then ready without intervention.
    (Last in this module: the engine is replaced.)"""
    from cluster.tools import chaos

    body = {"model": "smollm2-135m-instruct", "prompt": PROMPT, "max_tokens": 200,
            "temperature": 0, "extra_body": {"ignore_eos": True}}
    want = server.client.completions.create(**body).choices[0].text
    stream = server.client.completions.create(**body, stream=True)
    pieces, seen = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 8:
            chaos.kill_engine(NAME, NAME)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not seen:
                health = requests.get(server.base + "/health", timeout=30)
                if health.status_code != 200:
                    seen.append(health)
    assert "".join(pieces) == want
    assert seen and seen[0].status_code == 503 and seen[0].headers.get("retry-after")
    state = seen[0].json()
    assert state["status"] in ("recovering", "starting"), state
    assert not any(c.isdigit() for c in state["reason"]), state  # no pid, IP or port
    deadline = time.monotonic() + 120
    while requests.get(server.base + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.5)


def test_app_builder_takes_serve_config_args(monkeypatch):
    """What KubeRay's serveConfigV2 (or `serve run cluster.serving.http.deploy:app_builder k=v`) passes."""
    from cluster.contract.config import ConfigError
    from cluster.serving.http.deploy import app_builder

    monkeypatch.setenv("SHARDLM_API_KEY", "sk-c")
    app = app_builder({"tensor_parallel_size": "2", "cpus_per_worker": "0.5", "model": "123",
                       "api_keys": "sk-a, sk-b", "max_body_bytes": "1024",
                       "served_model_name": "smol"})
    (settings,) = app._bound_deployment.init_args
    assert settings.config["parallel"]["tensor_parallel_size"] == 2
    assert settings.config["parallel"]["cpus_per_worker"] == 0.5
    assert settings.config["model"]["model"] == "123"  # string fields stay strings
    assert settings.api_keys == ("sk-a", "sk-b", "sk-c") and settings.max_body_bytes == 1024
    assert settings.served_model_name == "smol"
    with pytest.raises(ConfigError, match="tensor_parallel_sizee"):
        app_builder({"tensor_parallel_sizee": 2})
