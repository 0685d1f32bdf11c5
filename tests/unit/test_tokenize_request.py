"""``POST /tokenize`` and ``/detokenize`` without a server: the body's two forms and the 400s
naming the field (cluster.serving.http.tokenize), and the engine side
(cluster.engine.tokenization through Admission) with the default model's own tokenizer,
against transformers' calls. The routes over HTTP: tests/e2e/test_tokenize_api.py."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from cluster.contract.errors import RequestError
from cluster.engine import chat, tokenization
from cluster.engine.admission import Admission
from cluster.serving.http.format import ApiError
from cluster.serving.http.tokenize import (TokenizeChatRequest, TokenizeCompletionRequest,
                                           engine_request, parse_tokenize)

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]


def _parse(body) -> object:
    return parse_tokenize(body if isinstance(body, bytes) else json.dumps(body).encode())


def test_the_two_forms_and_their_defaults():
    text = _parse({"prompt": "hi"})
    assert isinstance(text, TokenizeCompletionRequest) and text.add_special_tokens is True
    assert engine_request(text) == ({"prompt": "hi", "add_special_tokens": True,
                                     "return_token_strs": False}, "prompt")
    conv = _parse({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "model": "m"})
    assert isinstance(conv, TokenizeChatRequest)
    assert (conv.add_generation_prompt, conv.continue_final_message, conv.add_special_tokens) \
        == (True, False, False)
    request, field = engine_request(conv)
    assert field == "messages" and request["messages"] == [{"role": "user", "content": "ab"}]
    assert request["tools"] is None
    # continuing the last message: no generation prompt unless asked (then refused)
    assert _parse({"messages": CHAT, "continue_final_message": True}).add_generation_prompt is False


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "messages": CHAT}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt"),
    ({"prompt": "a", "continue_final_message": True}, "continue_final_message"),
    ({"prompt": "a", "tools": []}, "tools"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "a", "chat_template": "x"}, "chat_template"),
    ({"messages": CHAT, "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    (b"{nope", None), (b"[1]", None), (b"\xff\xfe\x00", None),
])
def test_bad_bodies_are_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as caught:
        _parse(body)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.body()


@pytest.fixture(scope="module")
def engine():
    import transformers

    from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model

    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    return SimpleNamespace(admission=Admission(tokenizer, vocab, 2048), max_model_len=2048,
                           tokenizer=tokenizer, vocab=vocab)


def test_engine_side_matches_transformers(engine):
    tok = engine.tokenizer
    out = tokenization.tokenize(engine, {"prompt": "Hello world", "return_token_strs": True})
    assert out == {"tokens": tok("Hello world").input_ids, "max_model_len": 2048,
                   "token_strs": tok.convert_ids_to_tokens(tok("Hello world").input_ids)}
    # the ids a prompt is admitted with
    assert out["tokens"] == engine.admission.prompt_ids("Hello world", None)
    conv = tokenization.tokenize(engine, {"messages": CHAT})["tokens"]
    assert conv == engine.admission.prompt_ids(None, None, CHAT)
    assert conv == tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
    cont = tokenization.tokenize(engine, {"messages": CHAT, "continue_final_message": True,
                                          "add_generation_prompt": False})["tokens"]
    assert tok.decode(cont).endswith("Hello, I am")
    ids = tok("naïve — 東京").input_ids
    assert tokenization.detokenize(engine, ids) == {"prompt": tok.decode(ids)}


def test_engine_side_names_the_field_at_fault(engine):
    for ids in ([engine.vocab], [0, -1], [1, "2"], [True]):
        with pytest.raises(RequestError) as caught:
            tokenization.detokenize(engine, ids)
        assert caught.value.param == "tokens"
    with pytest.raises(RequestError) as caught:
        tokenization.tokenize(engine, {"prompt": "a\ud800"})
    assert caught.value.param == "prompt" and "surrogate" in caught.value.message
    # a template that drops the messages' text: there is nothing to continue
    dropping = copy.deepcopy(engine.tokenizer)
    dropping.chat_template = "{% for m in messages %}<{{ m.role }}>{% endfor %}"
    with pytest.raises(RequestError) as caught:
        chat.render(dropping, CHAT, continue_final_message=True, add_generation_prompt=False)
    assert caught.value.param == "continue_final_message"
