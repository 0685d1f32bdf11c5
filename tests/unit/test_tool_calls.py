"""Tool calls: the constraint of each tool_choice (checked with jsonschema, an independent
validator), the Hermes-style rendering for templates without tools (with the default model's
own tokenizer and template), and the output read back as calls, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cluster.contract.errors import RequestError
from cluster.engine import chat
from cluster.serving.http import tools
from cluster.serving.http.protocol import ChatCompletionRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=ASK, **kw)


def test_required_choice_holds_the_output_to_calls_of_the_tools():
    shown, constraint = tools.engine_fields(_request(tools=[WEATHER, TIME], tool_choice="required"))
    assert [t["function"]["name"] for t in shown] == ["get_weather", "get_time"]
    schema = json.loads(constraint["json"])
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}},
                         {"name": "get_time", "arguments": {"zone": "CET"}}], schema)
    for wrong in ([], [{"name": "get_weather", "arguments": {"town": "Paris"}}],
                  [{"name": "other", "arguments": {}}], {"name": "get_time"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    single = tools.engine_fields(_request(tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False))[1]["json"]
    single = json.loads(single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "A"}}] * 2, single)


def test_named_choice_is_the_function_parameters_and_none_shows_no_tools():
    named = _request(tools=[WEATHER, TIME],
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(tools.engine_fields(named)[1]["json"]) == TIME["function"]["parameters"]
    assert tools.engine_fields(_request(tools=[WEATHER], tool_choice="none")) == (None, None)
    assert tools.engine_fields(_request(tools=[WEATHER]))[1] is None  # auto: unconstrained


@pytest.mark.parametrize("kw, words", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "drop response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "not several"),
])
def test_contradicting_tool_fields_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        _request(**kw)


def test_auto_output_with_calls_parses_into_content_and_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}')
    content, calls = tools.parse("auto", text)  # the last one unclosed: cut by the stop token
    assert content == "Let me check.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2
    assert tools.finish_reason("stop", "auto", bool(calls)) == "tool_calls"
    assert tools.finish_reason("length", "auto", bool(calls)) == "length"
    broken = "<tool_call>{not json}</tool_call>"
    assert tools.parse("auto", broken) == (broken, [])  # nothing the model wrote is lost
    assert tools.parse("auto", "Just text.") == ("Just text.", [])
    assert tools.parse("required", "[oops") == ("[oops", [])


@pytest.mark.parametrize("mode, text", [
    ("auto", 'It is <b>hot</b> <tool_ maybe. <tool_call>{"name": "get_weather", '
             '"arguments": {"city": "Rome"}}</tool_call>'),
    ("auto", "No call here, only <tool_c"),
    ("required", '[{"name": "get_time", "arguments": {"zone": "UTC"}}]'),
    ("named", '{"city": "Oslo", "unit": "C"}'),
])
def test_streamed_deltas_add_up_to_the_whole_parse(mode, text):
    name = "get_weather" if mode == "named" else None
    parser, content, calls = tools.StreamParser(mode, name), "", {}
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    for k, piece in enumerate(pieces):
        c, deltas = parser.feed(piece)
        if k == len(pieces) - 1:
            rest, more = parser.finish()
            c, deltas = (c or "") + (rest or ""), deltas + more
        content += c or ""
        for d in deltas:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    whole_content, whole_calls = tools.parse(mode, text, name)
    assert content == (whole_content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole_calls]


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model

    return transformers.AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def test_a_template_without_tools_hears_of_them_and_earlier_calls_read_back(tokenizer):
    assert "tools" not in tokenizer.chat_template  # SmolLM2's template drops tools silently
    conversation = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    text = chat.render(tokenizer, conversation, [WEATHER])
    assert text.index("<tools>") < text.index('"get_weather"') < text.index("Weather in Paris?")
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # the assistant's earlier call, as rendered, parses back into the same call
    said = chat.hermes_messages(conversation, [])[1]["content"]
    _, calls = tools.parse("auto", said)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    plain = chat.render(tokenizer, ASK)  # no tools: the template's own text
    assert plain == tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("messages, tools_, words", [
    ([{"role": "assistant"}], None, "no content"),
    ([{"role": "robot", "content": "x"}], None, "role among"),
    ([{"role": "user", "content": "x", "tool_calls": []}], None, "only an assistant"),
    (ASK, [{"function": {}}], "tools must be"),
])
def test_malformed_conversations_name_what_is_wrong(tokenizer, messages, tools_, words):
    with pytest.raises(RequestError, match=words):
        chat.render(tokenizer, messages, tools_)
