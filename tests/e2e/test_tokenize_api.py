"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, and OpenAI's ``GET /v1/models/{id}``,
over real HTTP: the Ray Serve app of cluster.serving.http.app in front of the engine service
(SmolLM2-135M-Instruct at tp=2, bf16 in deterministic mode). Token ids are checked against
transformers' own tokenizer of the checkpoint (``tokenizer(text)``, ``apply_chat_template``,
``decode``) and against what the engine admits a completion or chat request with (its
``usage.prompt_tokens``, and the same greedy text from the ids as from the text); bad input
is a 400 in OpenAI's error shape naming the field. And deterministic mode through the served
API: a completion's tokens and logprobs are the same alone as among concurrent requests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from cluster.checkpoints.store import DEFAULT_MODEL
from tests.api_server import API_KEY, error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "tokenize-e2e"
TEXTS = ["The capital of France is", "  leading spaces, tabs\tand\nnewlines",
         "naïve café — 東京 🚀 ∑x²", "<|im_start|>user literal special tokens<|im_end|>"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"}]
PREFILL = CHAT + [{"role": "assistant", "content": "The capital of France is"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME, dtype="bfloat16", deterministic=True) as server:
        yield server


def tokenize(server, **body) -> dict:
    response = server.post("/tokenize", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}, out
    assert out["count"] == len(out["tokens"])
    return out


def detokenize(server, tokens: list[int], **body) -> str:
    response = server.post("/detokenize", {"tokens": tokens, **body})
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"prompt"}
    return response.json()["prompt"]


def chat_ids(tokenizer, messages, add_special_tokens=False, **options) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


# ---- /tokenize ------------------------------------------------------------------------------
def test_tokenize_text_matches_transformers_and_admission(server, hf):
    tokenizer, _ = hf
    max_model_len = server.client.models.retrieve(DEFAULT_MODEL).model_extra["max_model_len"]
    for text in TEXTS:
        out = tokenize(server, prompt=text)
        assert out["tokens"] == tokenizer(text).input_ids, text
        assert out["token_strs"] is None and out["max_model_len"] == max_model_len
        plain = tokenize(server, prompt=text, add_special_tokens=False, model=DEFAULT_MODEL,
                         return_token_strs=True)
        assert plain["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert plain["token_strs"] == tokenizer.convert_ids_to_tokens(plain["tokens"])
    assert tokenize(server, prompt="")["tokens"] == tokenizer("").input_ids

    # the ids the engine admits a completion with: as many, and the same greedy text from
    # the ids as from the text
    ids = tokenize(server, prompt=TEXTS[0])["tokens"]
    kwargs = dict(model=DEFAULT_MODEL, max_tokens=8, temperature=0)
    by_text = server.client.completions.create(prompt=TEXTS[0], **kwargs)
    by_ids = server.client.completions.create(prompt=ids, **kwargs)
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.choices[0].text == by_ids.choices[0].text


def test_tokenize_messages_matches_the_chat_template_and_admission(server, hf):
    tokenizer, _ = hf
    out = tokenize(server, messages=CHAT, return_token_strs=True)
    assert out["tokens"] == chat_ids(tokenizer, CHAT, add_generation_prompt=True)
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    chat = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                 max_completion_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]

    assert tokenize(server, messages=CHAT, add_generation_prompt=False)["tokens"] == \
        chat_ids(tokenizer, CHAT, add_generation_prompt=False)
    assert tokenize(server, messages=CHAT, add_special_tokens=True)["tokens"] == \
        chat_ids(tokenizer, CHAT, add_special_tokens=True, add_generation_prompt=True)
    prefill = chat_ids(tokenizer, PREFILL, continue_final_message=True)
    assert tokenize(server, messages=PREFILL, continue_final_message=True)["tokens"] == prefill
    assert tokenize(server, messages=PREFILL, continue_final_message=True,
                    add_generation_prompt=False)["tokens"] == prefill
    assert tokenizer.decode(prefill).endswith("The capital of France is")

    # content as text parts, as /v1/chat/completions takes it
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    assert tokenize(server, messages=parts)["tokens"] == chat_ids(
        tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)

    # with tools: the prompt a chat completion with them is admitted with
    with_tools = tokenize(server, messages=CHAT, tools=TOOLS)
    assert with_tools["count"] > out["count"]
    assert "get_weather" in tokenizer.decode(with_tools["tokens"])
    chat = server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                 tools=TOOLS, max_completion_tokens=1)
    assert chat.usage.prompt_tokens == with_tools["count"]


# ---- /detokenize ----------------------------------------------------------------------------
def test_detokenize_matches_decode(server, hf):
    tokenizer, model = hf
    vocab_size = model.config.vocab_size
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert detokenize(server, ids) == tokenizer.decode(ids) == text
    special = chat_ids(tokenizer, CHAT, add_generation_prompt=True)
    assert detokenize(server, special, model=DEFAULT_MODEL) == tokenizer.decode(special)
    assert "<|im_start|>" in tokenizer.decode(special)  # special tokens are kept, as vLLM's
    edges = [0, 1, 2, vocab_size - 1, 28, 9690]
    assert detokenize(server, edges) == tokenizer.decode(edges)
    assert detokenize(server, []) == ""


# ---- /v1/models/{id} ------------------------------------------------------------------------
def test_retrieve_model_and_unknown_ids(server):
    response = requests.get(f"{server.base}/v1/models/{DEFAULT_MODEL}", timeout=30,
                            headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["id"] == DEFAULT_MODEL and card["object"] == "model"
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    listed = requests.get(f"{server.base}/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    assert listed == [card]
    assert server.client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL

    for unknown in ("gpt-4o", "org/some-model", "smollm2-135m-instruct-x"):
        response = requests.get(f"{server.base}/v1/models/{unknown}", timeout=30,
                                headers={"Authorization": f"Bearer {API_KEY}"})
        error = error_of(response, 404, "model")
        assert error["code"] == "model_not_found" and unknown in error["message"], error
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4o")


# ---- bad input ------------------------------------------------------------------------------
def test_bad_input_is_a_400_naming_the_field(server, hf):
    vocab_size = hf[1].config.vocab_size

    def refused(path: str, body, param: str, status: int = 400) -> dict:
        return error_of(server.post(path, body), status, param)

    refused("/tokenize", {"prompt": "hi", "messages": CHAT}, "prompt")
    refused("/tokenize", {}, "prompt")
    refused("/tokenize", {"prompt": 5}, "prompt")
    refused("/tokenize", {"prompt": "hi", "add_generation_prompt": True}, "add_generation_prompt")
    refused("/tokenize", {"prompt": "hi", "tools": TOOLS}, "tools")
    refused("/tokenize", {"messages": []}, "messages")
    refused("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages")
    refused("/tokenize", {"messages": PREFILL, "continue_final_message": True,
                          "add_generation_prompt": True}, "continue_final_message")
    refused("/tokenize", {"prompt": "hi", "chat_template": "{{ x }}"}, "chat_template")
    refused("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens")
    # a lone surrogate (JSON's \u escapes can carry one; no tokenizer can read it)
    for raw, param in (('{"prompt": "abc\\ud800def"}', "prompt"),
                       ('{"messages": [{"role": "user", "content": "x\\udfffy"}]}', "messages")):
        error = error_of(server.post("/tokenize", raw, headers={"Content-Type": "application/json"}),
                         400, param)
        assert "surrogate" in error["message"], error
    error_of(server.post("/tokenize", "{not json", headers={"Content-Type": "application/json"}),
             400)
    error_of(server.post("/tokenize", [1, 2]), 400)

    for ids in ([vocab_size], [1, 2, vocab_size + 7], [(1 << 31) - 1]):
        error = refused("/detokenize", {"tokens": ids}, "tokens")
        assert str(ids[-1]) in error["message"] and str(vocab_size) in error["message"], error
    refused("/detokenize", {"tokens": [-1]}, "tokens")
    refused("/detokenize", {"tokens": [1.5]}, "tokens")
    refused("/detokenize", {"tokens": "1 2"}, "tokens")
    refused("/detokenize", {}, "tokens")

    for path, body in (("/tokenize", {"prompt": "hi", "model": "gpt-4o"}),
                       ("/detokenize", {"tokens": [1], "model": "gpt-4o"})):
        assert "gpt-4o" in refused(path, body, "model", 404)["message"]
        error_of(server.post(path, body, key=None), 401)  # the API key guards them too
    # nothing was left running: tokenizing holds no engine request
    assert server.wait_idle()["num_running"] == 0


def test_openapi_describes_the_routes(server):
    spec = requests.get(server.base + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in body["schema"]["anyOf"]} == {
        "TokenizeCompletionRequest", "TokenizeChatRequest"}
    assert {"add_generation_prompt", "continue_final_message", "add_special_tokens",
            "return_token_strs", "tools", "messages"} <= set(schemas["TokenizeChatRequest"]["properties"])
    assert spec["paths"]["/tokenize"]["post"]["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"].endswith("/TokenizeResponse")
    assert set(schemas["TokenizeResponse"]["properties"]) == {
        "count", "max_model_len", "tokens", "token_strs"}
    assert "/detokenize" in spec["paths"] and "/v1/models/{model}" in spec["paths"]
    assert DEFAULT_MODEL in json.dumps(schemas["DetokenizeRequest"]["properties"]["model"])


def test_a_completion_is_the_same_alone_and_among_concurrent_requests(server):
    """Deterministic mode as ``shardlm serve`` deploys it: a greedy completion with logprobs
    alone, then the same one sent at once with seven others (the engine batches them, their
    prompts chunked beside its decode steps): the same tokens, and every logprob and top
    logprob the same float."""
    def ask(prompt: str):
        out = server.client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=16,
                                               temperature=0, logprobs=5)
        lp = out.choices[0].logprobs
        return out.choices[0].text, lp.tokens, lp.token_logprobs, lp.top_logprobs

    target = "Three facts about the Moon: first,"
    alone = ask(target)
    others = [f"Write a list of {n} colors, then {n} fruits, then {n} countries:" for n in range(3, 10)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, p) for p in others[:4] + [target] + others[4:]]
        crowd = [f.result() for f in futures]
    assert len(alone[1]) == 16
    assert crowd[4] == alone
