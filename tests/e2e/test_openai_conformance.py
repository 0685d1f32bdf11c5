"""OpenAI conformance, as the official `openai` client sees the API: completions and chat,
streamed and not, n > 1, stop strings that span tokens, logprobs and echo, usage (streamed
with ``stream_options.include_usage`` too), and the error of every 4xx.

The server runs the default model at tp=2 in float32; token logprobs are checked against
`transformers` on the same checkpoint (the independent reference), streamed results
against the same request unstreamed."""

from __future__ import annotations

import json
import re

import openai
import pytest
import requests
import torch

from cluster.checkpoints.store import DEFAULT_MODEL
from tests.api_server import API_KEY, PROMPT, error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "openai-conformance"
CHAT = [{"role": "user", "content": "Name three colours."}]
LOGPROB_TOL = 2e-3  # float32 at tp=2 against float32 transformers, in nats


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME) as server:
        yield server


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the next-token logits at every position: (len(ids), vocab)."""
    with torch.no_grad():
        return torch.log_softmax(hf[1](torch.tensor([ids])).logits[0].float(), dim=-1)


def complete(server, **kwargs):
    return server.client.completions.create(model=DEFAULT_MODEL, **kwargs)


def chat(server, **kwargs):
    return server.client.chat.completions.create(model=DEFAULT_MODEL, **kwargs)


def counts(usage) -> tuple[int, int, int]:
    """Usage without the cached-token detail (a repeated prompt hits the prefix cache)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def streamed_texts(chunks, chat_api: bool = False) -> tuple[dict, dict]:
    """Per choice index: the streamed text and the finish reasons seen (chunks with choices)."""
    texts, reasons = {}, {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = (c.delta.content or "") if chat_api else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return texts, reasons


# ---- completions and chat, streamed and not --------------------------------------------------
def test_completion_shape_and_usage_count_tokens(server, hf):
    out = complete(server, prompt=PROMPT, max_tokens=7, temperature=0,
                   extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.model == DEFAULT_MODEL and isinstance(out.created, int)
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    prompt_ids = hf[0](PROMPT).input_ids
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == len(prompt_ids) + 7
    # the text is what those 7 tokens decode to
    assert len(hf[0](choice.text, add_special_tokens=False).input_ids) in range(5, 10)


def test_streamed_completion_equals_the_unstreamed_one_and_usage_comes_last(server):
    kwargs = dict(prompt=PROMPT, max_tokens=12, temperature=0)
    whole = complete(server, **kwargs)
    chunks = list(complete(server, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    texts, reasons = streamed_texts(chunks)
    assert texts == {0: whole.choices[0].text}
    assert reasons == {0: [whole.choices[0].finish_reason]}  # once, in the choice's last chunk
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(complete(server, stream=True, **kwargs))  # usage only when asked for
    assert all(c.usage is None for c in plain)
    assert streamed_texts(plain)[0] == texts


def test_chat_streamed_equals_unstreamed_with_usage(server, hf):
    kwargs = dict(messages=CHAT, max_completion_tokens=10, temperature=0)
    whole = chat(server, **kwargs)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    template = hf[0].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(hf[0](template, add_special_tokens=False).input_ids)

    chunks = list(chat(server, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, reasons = streamed_texts(chunks, chat_api=True)
    assert texts == {0: choice.message.content}
    assert reasons == {0: [choice.finish_reason]}
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])


# ---- n > 1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_n_choices_stream_whole_and_equal_the_unstreamed_ones(server, api):
    """Seeded sampling: each streamed choice has the unstreamed choice's text and finish
    reason; greedy choices that end in the same step each get their last text and reason."""
    if api == "completions":
        call, kwargs = complete, dict(prompt="Once upon a time", max_tokens=10)
    else:
        call, kwargs = chat, dict(messages=CHAT, max_completion_tokens=10)
    for sampling in (dict(temperature=0.9, seed=11, n=3), dict(temperature=0, n=2)):
        whole = call(server, **kwargs, **sampling)
        assert sorted(c.index for c in whole.choices) == list(range(sampling["n"]))
        chunks = list(call(server, stream=True, stream_options={"include_usage": True},
                           **kwargs, **sampling))
        texts, reasons = streamed_texts(chunks, chat_api=api == "chat")
        want = {c.index: (c.message.content if api == "chat" else c.text) for c in whole.choices}
        assert texts == want
        assert reasons == {c.index: [c.finish_reason] for c in whole.choices}
        assert counts(chunks[-1].usage) == counts(whole.usage)
    assert len(set(want.values())) == 1  # greedy: the copies agree


# ---- stop strings ----------------------------------------------------------------------------
def test_a_stop_string_across_two_tokens_cuts_the_text_and_stops_the_engine(server):
    """The stop string is the end of one generated token and the start of the next: the text
    ends before it, the usage counts the tokens up to the one that completed it, and the
    engine stops generating (a few tokens, not max_tokens)."""
    base = dict(prompt="The three primary colours are", temperature=0, max_tokens=40,
                extra_body={"ignore_eos": True})
    full = complete(server, logprobs=0, **base).choices[0]
    tokens, offsets, text = full.logprobs.tokens, full.logprobs.text_offset, full.text
    k = next(k for k in range(1, len(tokens) - 1)
             if len(tokens[k].strip()) >= 2 and len(tokens[k + 1].strip()) >= 2
             and text.find(tokens[k][-2:] + tokens[k + 1][:2]) == offsets[k] + len(tokens[k]) - 2)
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    cut = offsets[k] + len(tokens[k]) - 2

    before = server.stats()["generation_tokens"]
    long = dict(base, max_tokens=400)
    out = complete(server, stop=[stop, "never-in-this-text"], **long)
    assert out.choices[0].text == text[:cut] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == k + 2
    chunks = list(complete(server, stop=stop, stream=True,
                           stream_options={"include_usage": True}, **long))
    texts, reasons = streamed_texts(chunks)
    assert texts == {0: text[:cut]} and reasons == {0: ["stop"]}
    assert chunks[-1].usage.completion_tokens == k + 2
    stats = server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    # two requests of up to 400 tokens: the engine made a few past each stop, not hundreds
    assert stats["generation_tokens"] - before < 2 * (k + 2) + 20

    in_chat = chat(server, messages=CHAT, max_completion_tokens=30, temperature=0)
    words = in_chat.choices[0].message.content
    stop = words[len(words) // 2:len(words) // 2 + 3]
    cut_chat = chat(server, messages=CHAT, max_completion_tokens=30, temperature=0, stop=stop)
    assert cut_chat.choices[0].message.content == words[:words.index(stop)]
    assert cut_chat.choices[0].finish_reason == "stop"


# ---- logprobs and echo -----------------------------------------------------------------------
def test_completion_logprobs_match_transformers(server, hf):
    out = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    (choice,) = out.choices
    lp = choice.logprobs
    prompt_ids = hf[0](PROMPT).input_ids
    tokens = prompt_ids + hf[0](choice.text, add_special_tokens=False).input_ids
    ref = hf_logprobs(hf, tokens)
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 6
    for i, (logprob, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        at = len(prompt_ids) + i - 1  # the position that predicts generated token i
        assert logprob == pytest.approx(ref[at].max().item(), abs=LOGPROB_TOL)  # greedy
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)
        second = torch.topk(ref[at], 2).values[1].item()
        assert min(top.values()) == pytest.approx(second, abs=LOGPROB_TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs_match_transformers(server, hf):
    out = chat(server, messages=CHAT, max_completion_tokens=5, temperature=0, logprobs=True,
               top_logprobs=3)
    content = out.choices[0].logprobs.content
    template = hf[0].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = hf[0](template, add_special_tokens=False).input_ids
    ref = hf_logprobs(hf, prompt_ids + [int(torch.argmax(hf_logprobs(hf, prompt_ids)[-1]))])
    assert len(content) == out.usage.completion_tokens == 5
    assert content[0].logprob == pytest.approx(ref[len(prompt_ids) - 1].max().item(),
                                               abs=LOGPROB_TOL)
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(chat(server, messages=CHAT, max_completion_tokens=5, temperature=0,
                         logprobs=True, top_logprobs=3, stream=True))
    streamed_content = [e for c in streamed for ch in c.choices
                        for e in (ch.logprobs.content if ch.logprobs else [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed_content] == \
        [(e.token, round(e.logprob, 4)) for e in content]


def test_echo_returns_the_prompt_with_its_logprobs(server, hf):
    plain = complete(server, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = complete(server, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert counts(echoed.usage) == counts(plain.usage)

    out = complete(server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp, prompt_ids = out.choices[0].logprobs, hf[0](PROMPT).input_ids
    n_prompt = len(prompt_ids)
    assert "".join(lp.tokens) == out.choices[0].text and out.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(PROMPT)
    ref = hf_logprobs(hf, prompt_ids)
    for i in range(1, n_prompt):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, prompt_ids[i]].item(),
                                                     abs=LOGPROB_TOL)
        best = int(torch.argmax(ref[i - 1]))
        assert lp.top_logprobs[i][hf[0].decode([best])] == pytest.approx(
            ref[i - 1, best].item(), abs=LOGPROB_TOL)
    # the prompt is computed whole (not from the prefix cache): asked twice, the same figures
    again = complete(server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs[:n_prompt] == lp.token_logprobs[:n_prompt]


def test_echo_of_token_prompts_streams_and_several_choices(server, hf):
    ids = hf[0]("Roses are red,", add_special_tokens=False).input_ids
    plain = complete(server, prompt=ids, max_tokens=4, temperature=0).choices[0].text
    out = complete(server, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert out.choices[0].text == hf[0].decode(ids) + plain

    chunks = list(complete(server, prompt=[PROMPT, "Roses are red,"], max_tokens=4,
                           temperature=0, echo=True, n=2, stream=True))
    texts, _ = streamed_texts(chunks)
    first = {}
    for chunk in chunks:
        for c in chunk.choices:
            first.setdefault(c.index, c.text)
    assert sorted(texts) == [0, 1, 2, 3]
    for index, text in texts.items():
        prompt = PROMPT if index < 2 else "Roses are red,"
        assert first[index].startswith(prompt) and text.startswith(prompt)
        unstreamed = complete(server, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
        assert text == prompt + unstreamed

    streamed_lp = list(complete(server, prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                logprobs=0, stream=True))
    tokens = [t for c in streamed_lp for ch in c.choices for t in ch.logprobs.tokens]
    offsets = [o for c in streamed_lp for ch in c.choices for o in ch.logprobs.text_offset]
    assert "".join(tokens) == "".join(t for c in streamed_lp for t in c.choices[0].text)
    assert len(tokens) == len(hf[0](PROMPT).input_ids) + 2
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# ---- structured output and tool calls --------------------------------------------------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _streamed_calls(chunks) -> tuple[str, dict, list]:
    """A streamed chat's content, its tool calls put together from their deltas (index ->
    id, name, arguments) and its finish reasons."""
    content, calls, reasons = "", {}, []
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return content, calls, reasons


def test_response_format_json_schema_validates_streamed_and_not(server):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    for seed in range(3):
        whole = chat(server, messages=ask, max_completion_tokens=80, temperature=0.8, seed=seed,
                     response_format=fmt)
        (choice,) = whole.choices
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        chunks = list(chat(server, messages=ask, max_completion_tokens=80, temperature=0.8,
                           seed=seed, response_format=fmt, stream=True))
        assert streamed_texts(chunks, chat_api=True)[0] == {0: choice.message.content}
    obj = chat(server, max_completion_tokens=120, temperature=0,
               response_format={"type": "json_object"}, messages=[
                   {"role": "user", "content": "Give me a JSON object with a cat's name and age."}])
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_structured_fields_through_the_client(server):
    """vLLM's names, as its users send them through the openai client's extra_body."""
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    cases = [({"guided_regex": phone}, lambda t: re.fullmatch(phone, t)),
             ({"structured_outputs": {"regex": phone}}, lambda t: re.fullmatch(phone, t)),
             ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
             ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
             ({"guided_json": PERSON}, lambda t: json.loads(t).keys() == {"name", "age"}),
             ({"structured_outputs": {"grammar": 'root ::= "x" [0-9]+'}},
              lambda t: re.fullmatch(r"x\d+", t))]
    for extra, valid in cases:
        out = complete(server, prompt="Answer: ", max_tokens=60, temperature=0.7, seed=3,
                       extra_body=extra)
        assert valid(out.choices[0].text), (extra, out.choices[0].text)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_calls_are_parsed_by_the_client_streamed_and_not(server, choice):
    import jsonschema

    tool_choice = ("required" if choice == "required"
                   else {"type": "function", "function": {"name": "get_weather"}})
    # one call: this small model would go on adding calls to the array until the length
    kwargs = dict(messages=ASK_WEATHER, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
                  max_completion_tokens=80, temperature=0.6, seed=11, parallel_tool_calls=False)
    whole = chat(server, **kwargs)
    (c,) = whole.choices
    assert c.message.tool_calls, c.message
    for call in c.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if choice == "named":
        assert [t.function.name for t in c.message.tool_calls] == ["get_weather"]
    assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")
    content, calls, reasons = _streamed_calls(chat(server, stream=True, **kwargs))
    assert not content and reasons == [c.finish_reason]
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == [
        (t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    assert all(v["id"] for v in calls.values())


def test_auto_tool_choice_reads_calls_out_of_the_text_and_takes_results_back(server):
    """In auto the model may call or answer. The output is held here (by a regex) to one call
    in the Hermes words the engine teaches a template without tools, so the parser's part is
    what is checked: content before the call, the call, finish reason tool_calls. The call
    and its result then go back as the next turn."""
    forced = ('Let me check\\.\n<tool_call>\n\\{"name": "get_weather", "arguments": '
              '\\{"city": "[A-Z][a-z]{2,9}", "unit": "celsius"\\}\\}\n</tool_call>')
    kwargs = dict(messages=ASK_WEATHER, tools=[WEATHER], max_completion_tokens=60,
                  temperature=0, extra_body={"structured_outputs": {"regex": forced}})
    whole = chat(server, **kwargs)
    (c,) = whole.choices
    assert c.message.content == "Let me check.\n" and c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["unit"] == "celsius"
    content, calls, reasons = _streamed_calls(chat(server, stream=True, **kwargs))
    assert content == c.message.content and reasons == ["tool_calls"]
    assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == [
        ("get_weather", args)]
    plain = chat(server, messages=ASK_WEATHER, tools=[WEATHER], max_completion_tokens=8,
                 temperature=0, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None
    follow = chat(server, max_completion_tokens=8, temperature=0, tools=[WEATHER], messages=[
        *ASK_WEATHER, c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- errors ------------------------------------------------------------------------------------
def _completion(**overrides) -> dict:
    return {"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2, **overrides}


JSON = {"Content-Type": "application/json"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error"}


def test_every_4xx_has_the_openai_error_shape(server):
    max_len = server.client.models.list().data[0].model_extra["max_model_len"]
    cases = [  # (method, path, body, headers, key, status, param)
        ("post", "/v1/completions", '{"model": ', JSON, True, 400, None),
        ("post", "/v1/completions", "[1]", JSON, True, 400, None),
        ("post", "/v1/completions", _completion(max_tokens="2"), None, True, 400, "max_tokens"),
        ("post", "/v1/completions", _completion(tempature=1), None, True, 400, "tempature"),
        ("post", "/v1/completions", _completion(top_p=0), None, True, 400, "top_p"),
        ("post", "/v1/completions", _completion(n=65), None, True, 400, "n"),
        ("post", "/v1/completions", _completion(best_of=3), None, True, 400, None),
        ("post", "/v1/completions", _completion(logprobs=21), None, True, 400, "logprobs"),
        ("post", "/v1/completions", _completion(stop=[""]), None, True, 400, "stop"),
        ("post", "/v1/completions", _completion(stop="x" * 513), None, True, 400, "stop"),
        ("post", "/v1/completions", _completion(prompt=" hi" * (max_len + 5)), None, True, 400,
         "prompt"),
        ("post", "/v1/completions", _completion(max_tokens=max_len), None, True, 400,
         "max_tokens"),
        ("post", "/v1/completions", _completion(prompt=[[10 ** 9]]), None, True, 400, "prompt"),
        ("post", "/v1/completions", _completion(stream=True, max_tokens=max_len), None, True,
         400, "max_tokens"),
        ("post", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": []}, None, True,
         400, "messages"),
        ("post", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": CHAT,
                                          "top_logprobs": 2}, None, True, 400, None),
        ("post", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": [
            {"role": "robot", "content": "hi"}]}, None, True, 400, "messages"),
        ("post", "/v1/completions", _completion(guided_regex="(("), None, True, 400, "regex"),
        ("post", "/v1/completions", _completion(structured_outputs={"json": {"type": "nope"}}),
         None, True, 400, "json"),
        ("post", "/v1/completions", _completion(response_format={"type": "json_schema"}), None,
         True, 400, "response_format"),
        ("post", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": CHAT,
                                          "tool_choice": "required"}, None, True, 400, None),
        ("post", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": CHAT, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "tool_choice": "required"}, None, True, 400, "json"),
        ("post", "/v1/completions", _completion(), None, False, 401, None),
        ("get", "/v1/models", None, None, False, 401, None),
        ("post", "/v1/completions", _completion(model="gpt-4"), None, True, 404, "model"),
        ("get", "/v1/models/gpt-4", None, None, True, 404, "model"),
        ("get", "/v1/nothing-here", None, None, True, 404, None),
        ("get", "/v1/completions", None, None, True, 405, None),
        ("post", "/v1/completions", _completion(prompt="x" * (10 << 20)), None, True, 413, None),
    ]
    for method, path, body, headers, keyed, status, param in cases:
        if method == "post":
            response = server.post(path, body, key=API_KEY if keyed else None,
                                   headers=headers or {})
        else:
            response = requests.get(server.base + path, timeout=60, headers={
                "Authorization": f"Bearer {API_KEY}"} if keyed else {})
        error = error_of(response, status, param if param is not None else "any")
        assert error["type"] == ERROR_TYPES[status], (path, body, error)
        assert response.headers["content-type"].startswith("application/json")

    # the official client raises its class for each status, with the fields parsed
    with pytest.raises(openai.BadRequestError) as bad:
        complete(server, prompt=PROMPT, max_tokens=max_len)
    assert bad.value.code == "context_length_exceeded" and bad.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        server.client.completions.create(model="gpt-4", prompt=PROMPT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong",
                      max_retries=0).completions.create(model=DEFAULT_MODEL, prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream opens
        list(complete(server, prompt=PROMPT, max_tokens=2, top_p=0, stream=True))
    assert streamed.value.param == "top_p"
    # and it goes on serving
    assert complete(server, prompt=PROMPT, max_tokens=2).choices[0].finish_reason in (
        "length", "stop")
    stats = server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_blocks"]
