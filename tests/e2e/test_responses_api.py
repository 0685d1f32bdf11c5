"""OpenAI's Responses API over real HTTP (POST /v1/responses streamed and not, GET and DELETE
/v1/responses/{id}), as the official `openai` client and the OpenAI Agents SDK see it, in
front of a real engine service (the default model at tp=2, float32).

References: a greedy response equals the chat completion of the same messages (the same
conversation written as chat messages by hand); JSON outputs validate with `jsonschema`;
streamed events are put together by the `openai` client's own stream accumulator
(``responses.stream``) and compared with the unstreamed response; the Agents SDK runs its
own agent loop (a function tool, its output fed back) against this server. The store runs
with small bounds here (STORE_ITEMS, STORE_BYTES) so that a test can fill it.
"""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import openai
import pytest
import requests

from cluster.checkpoints.store import DEFAULT_MODEL
from tests.api_server import API_KEY, error_of, serve_api

pytestmark = pytest.mark.slow

NAME = "responses-e2e"
STORE_ITEMS, STORE_BYTES = 8, 64 << 10
ASK = "What is the capital of France? Answer in one sentence."
LONG = "Write a long story about a dragon who learns to cook."
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}
CLOCK = {"type": "function", "name": "get_time", "description": "The time in a city",
         "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}}}}
ASK_WEATHER = "What is the weather like in Paris today?"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.fixture(scope="module")
def server(ray_session):
    with serve_api(NAME, response_store_items=STORE_ITEMS,
                   response_store_bytes=STORE_BYTES) as server:
        yield server


def create(server, **kwargs):
    return server.client.responses.create(model=DEFAULT_MODEL, **kwargs)


def chat(server, messages: list, **kwargs):
    return server.client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, **kwargs)


def chat_tool(tool: dict) -> dict:
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def collapsed(events) -> list[str]:
    """The event types in order, a run of deltas as one ``...delta*``."""
    out = []
    for event in events:
        kind = event.type + "*" if event.type.endswith(".delta") else event.type
        if not (out and out[-1] == kind and kind.endswith("*")):
            out.append(kind)
    return out


def store_stats(server) -> dict:
    import ray

    return ray.get(ray.get_actor(f"{NAME}-responses", namespace=NAME).stats.remote())


# ---- the response is the chat completion of the same messages ------------------------------
def test_plain_response_equals_the_chat_completion(server):
    r = create(server, input=ASK, max_output_tokens=24, temperature=0)
    c = chat(server, [{"role": "user", "content": ASK}], max_completion_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == DEFAULT_MODEL
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [p.type for p in item.content] == ["output_text"]
    assert r.output_text == c.choices[0].message.content and r.output_text
    done = c.choices[0].finish_reason == "stop"
    assert (r.status, item.status) == (("completed",) * 2 if done else ("incomplete",) * 2)
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens >= 0
    # the same input as items (a message of input_text parts) is the same request
    items = create(server, input=[{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": ASK[:20]}, {"type": "input_text", "text": ASK[20:]}]}],
        max_output_tokens=24, temperature=0)
    assert items.output_text == r.output_text


def test_instructions_are_a_system_message_first(server):
    rule = "You are a pirate. Always answer like a pirate."
    r = create(server, instructions=rule, input=ASK, max_output_tokens=24, temperature=0)
    c = chat(server, [{"role": "system", "content": rule}, {"role": "user", "content": ASK}],
             max_completion_tokens=24, temperature=0)
    assert r.instructions == rule and r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens
    # a developer message in the input is a system message too
    d = create(server, input=[{"role": "developer", "content": rule}, {"role": "user", "content": ASK}],
               max_output_tokens=24, temperature=0)
    assert d.output_text == r.output_text


def test_max_output_tokens_makes_an_incomplete_response(server):
    r = create(server, input=LONG, max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"
    assert r.max_output_tokens == 5
    c = chat(server, [{"role": "user", "content": LONG}], max_completion_tokens=5, temperature=0)
    assert r.output_text == c.choices[0].message.content


# ---- function tools ------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_function_call_and_its_output_fed_back(server, choice):
    """tool_choice required or named: the grammar holds the output to a call; the call's
    arguments follow the tool's schema. Its output, fed back with the call, continues the
    conversation as the chat completion of the same messages does."""
    tool_choice = "required" if choice == "required" else {"type": "function", "name": "get_weather"}
    r = create(server, input=ASK_WEATHER, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
               parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    assert r.status == "completed", r.output
    (call,) = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    if choice == "named":
        assert call.name == "get_weather"
        assert r.tool_choice.type == "function" and r.tool_choice.name == "get_weather"
    result = '{"temperature": 21, "sky": "clear"}'
    follow = create(server, tools=[WEATHER, CLOCK], temperature=0, max_output_tokens=30, input=[
        {"role": "user", "content": ASK_WEATHER}, call.to_dict(),
        {"type": "function_call_output", "call_id": call.call_id, "output": result}])
    c = chat(server, tools=[chat_tool(WEATHER), chat_tool(CLOCK)], temperature=0,
             max_completion_tokens=30, messages=[
                 {"role": "user", "content": ASK_WEATHER},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": call.call_id, "type": "function",
                      "function": {"name": call.name, "arguments": call.arguments}}]},
                 {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert follow.usage.input_tokens == c.usage.prompt_tokens
    message = c.choices[0].message
    if message.tool_calls:  # auto: the model may call again
        calls = [o for o in follow.output if o.type == "function_call"]
        assert [(x.name, x.arguments) for x in calls] == [
            (t.function.name, t.function.arguments) for t in message.tool_calls]
    else:
        assert follow.output_text == message.content


# ---- structured output -----------------------------------------------------------------------
def test_text_format_json_schema_and_json_object_hold(server):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    ask = "Describe a person as JSON."
    for temperature in (0, 0.8, 1.2):
        r = create(server, input=ask, text=fmt, temperature=temperature, max_output_tokens=80)
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    greedy = create(server, input=ask, text=fmt, temperature=0, max_output_tokens=80)
    c = chat(server, [{"role": "user", "content": ask}], temperature=0, max_completion_tokens=80,
             response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                     "schema": PERSON}})
    assert greedy.output_text == c.choices[0].message.content
    events = list(create(server, input=ask, text=fmt, temperature=0.8, max_output_tokens=80,
                         stream=True))
    jsonschema.validate(json.loads(events[-1].response.output_text), PERSON)
    obj = create(server, input="Give me a JSON object with a cat's name and age.", temperature=0,
                 text={"format": {"type": "json_object"}}, max_output_tokens=120)
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


# ---- streaming -----------------------------------------------------------------------------
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta*",
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]


def test_a_streamed_response_sends_every_event_in_order(server):
    kwargs = dict(input=ASK, max_output_tokens=24, temperature=0)
    whole = create(server, **kwargs)
    events = list(create(server, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert collapsed(events) == TEXT_EVENTS + [f"response.{whole.status}"]
    created, progress, added, part, *_ = events
    final = events[-1].response
    assert created.response.status == progress.response.status == "in_progress"
    assert created.response.output == [] and created.response.id == final.id != whole.id
    assert added.output_index == 0 and added.item.type == "message"
    assert added.item.status == "in_progress" and added.item.content == []
    assert (part.item_id, part.output_index, part.content_index) == (added.item.id, 0, 0)
    assert part.part.type == "output_text" and part.part.text == ""
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.item_id == added.item.id and e.content_index == 0 for e in deltas)
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert "".join(e.delta for e in deltas) == text_done.text == whole.output_text
    item_done = next(e for e in events if e.type == "response.output_item.done")
    assert item_done.item.to_dict() == final.output[0].to_dict()
    assert final.output_text == whole.output_text and final.status == whole.status
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens, whole.usage.output_tokens)
    # stored as it was sent, before its last event
    assert server.client.responses.retrieve(final.id).to_dict() == final.to_dict()

    # the client's own accumulator puts the events together into the same response
    with server.client.responses.stream(model=DEFAULT_MODEL, **kwargs) as stream:
        for _ in stream:
            pass
        accumulated = stream.get_final_response()
    assert accumulated.output_text == whole.output_text

    # on the wire: each event is named by its `event:` line, and nothing follows the last
    raw = server.post("/v1/responses", {"model": DEFAULT_MODEL, "stream": True, **kwargs})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in raw.text.split("\n\n") if b.strip()]
    for block in blocks:
        name, data = block.split("\n")
        assert name == "event: " + json.loads(data.removeprefix("data: "))["type"]
    assert json.loads(blocks[-1].split("\n")[1][6:])["type"] == f"response.{whole.status}"


@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_streamed_function_call_sends_its_arguments_in_order(server, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "name": "get_time"}
    kwargs = dict(input="What time is it in Tokyo?", tools=[WEATHER, CLOCK], temperature=0,
                  tool_choice=tool_choice, parallel_tool_calls=False, max_output_tokens=80)
    whole = create(server, **kwargs)
    events = list(create(server, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert collapsed(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta*", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    added = events[2].item
    assert added.type == "function_call" and added.arguments == "" and added.call_id
    deltas = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
    done = next(e for e in events if e.type.endswith("arguments.done"))
    (call,) = events[-1].response.output
    (unstreamed,) = whole.output
    assert deltas.strip() == done.arguments.strip() == call.arguments.strip()
    assert json.loads(call.arguments) == json.loads(unstreamed.arguments)
    assert call.name == unstreamed.name == (added.name)
    assert call.call_id == added.call_id and done.item_id == added.id == call.id
    with server.client.responses.stream(model=DEFAULT_MODEL, **kwargs) as stream:
        for _ in stream:
            pass
        accumulated = stream.get_final_response()
    assert json.loads(accumulated.output[0].arguments) == json.loads(unstreamed.arguments)


def test_a_streamed_response_cut_by_max_output_tokens_ends_incomplete(server):
    events = list(create(server, input=LONG, max_output_tokens=4, temperature=0, stream=True))
    assert collapsed(events) == TEXT_EVENTS + ["response.incomplete"]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.usage.output_tokens == 4


# ---- stored responses ----------------------------------------------------------------------
def test_previous_response_id_chains_the_conversation(server):
    """Each turn continues the stored conversation (its input and output, not its
    instructions) and equals the chat completion of the whole conversation."""
    turns = ["My name is Ada and I live in Rome.", "What is my name?", "Where do I live?"]
    messages, previous = [], None
    for i, text in enumerate(turns):
        r = create(server, input=text, previous_response_id=previous, max_output_tokens=20,
                   temperature=0, instructions="Be brief." if i == 0 else None)
        system = [{"role": "system", "content": "Be brief."}] if i == 0 else []
        messages.append({"role": "user", "content": text})
        c = chat(server, system + messages, max_completion_tokens=20, temperature=0)
        assert r.output_text == c.choices[0].message.content, i
        assert r.usage.input_tokens == c.usage.prompt_tokens and r.previous_response_id == previous
        messages.append({"role": "assistant", "content": r.output_text})
        previous = r.id
    stored = server.client.responses.retrieve(previous)
    assert stored.to_dict() == r.to_dict()


def test_store_false_delete_and_unknown_ids(server):
    kept = create(server, input=ASK, max_output_tokens=3, temperature=0)
    unkept = create(server, input=ASK, max_output_tokens=3, temperature=0, store=False)
    assert kept.store is True and unkept.store is False
    assert server.client.responses.retrieve(kept.id).id == kept.id
    for missing in (unkept.id, "resp_nothing"):
        with pytest.raises(openai.NotFoundError) as exc:
            server.client.responses.retrieve(missing)
        assert missing in exc.value.message and exc.value.code == "response_not_found"
        with pytest.raises(openai.BadRequestError) as exc:
            create(server, input="Go on.", previous_response_id=missing, max_output_tokens=2)
        assert exc.value.code == "previous_response_not_found"
        assert exc.value.param == "previous_response_id" and missing in exc.value.message
    server.client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        server.client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        server.client.responses.delete(kept.id)


def test_the_store_keeps_to_its_bounds(server):
    """Filled past both bounds (records of ~9 KiB of metadata, then small ones): it never holds
    more than STORE_ITEMS records or STORE_BYTES bytes, the least recently used are gone
    (404), and reading a record keeps it."""
    metadata = {f"k{i}": "x" * 512 for i in range(16)}
    ids, first = [], None
    for i in range(10):
        r = create(server, input=f"Say {i}.", max_output_tokens=1, temperature=0,
                   metadata=metadata)
        ids.append(r.id)
        if i == 0:
            first = r.id
        else:  # read the first one each time: it is never the least recently used
            server.client.responses.retrieve(first)
        stats = store_stats(server)
        assert stats["items"] <= STORE_ITEMS and stats["bytes"] <= STORE_BYTES, stats
    assert stats["bytes"] > STORE_BYTES - 10 * 1024 and stats["items"] < STORE_ITEMS  # bytes bind
    assert server.client.responses.retrieve(first).metadata == metadata
    assert server.client.responses.retrieve(ids[-1]).id == ids[-1]
    for gone in ids[1:10 - stats["items"] + 1]:
        error_of(requests.get(f"{server.base}/v1/responses/{gone}", timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"}), 404, "response_id")
    for i in range(STORE_ITEMS + 2):  # small records: now the count binds
        create(server, input=f"Say {i}.", max_output_tokens=1, temperature=0)
        stats = store_stats(server)
        assert stats["items"] <= STORE_ITEMS and stats["bytes"] <= STORE_BYTES, stats
    assert stats["items"] == STORE_ITEMS and stats["evicted"] > 0


def test_a_lost_store_is_a_clear_error_then_empty(server):
    """The store actor killed: Ray restarts it empty. Meanwhile calls that need it are 503
    (never a hang); after, the old ids are 404 and new responses are stored again."""
    import ray

    old = create(server, input=ASK, max_output_tokens=2, temperature=0)
    ray.kill(ray.get_actor(f"{NAME}-responses", namespace=NAME), no_restart=False)
    statuses, deadline = [], time.monotonic() + 60
    while True:  # ray.kill is asynchronous: the old process may answer first
        started = time.monotonic()
        response = requests.get(f"{server.base}/v1/responses/{old.id}", timeout=60,
                                headers={"Authorization": f"Bearer {API_KEY}"})
        assert time.monotonic() - started < 15  # the store's call timeout, not a hang
        statuses.append(response.status_code)
        if response.status_code == 404:
            break
        if response.status_code == 503:
            assert error_of(response, 503)["code"] == "store_unavailable"
        assert set(statuses) <= {200, 503} and statuses == sorted(statuses), statuses
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)
    assert error_of(response, 404, "response_id")["code"] == "response_not_found"
    new = create(server, input=ASK, max_output_tokens=2, temperature=0)
    assert server.client.responses.retrieve(new.id).id == new.id


# ---- the OpenAI Agents SDK ---------------------------------------------------------------------
def test_the_agents_sdk_runs_an_agent_with_a_function_tool(server):
    """The Agents SDK at its defaults (the Responses API over HTTP, its own agent loop),
    pointed at this server. tool_choice required makes the small model call the tool; the SDK
    runs it, feeds its output back and (its tool choice reset to auto) the model answers.
    (One call at a time: this small model would go on adding calls to a free array.)"""
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                        set_tracing_disabled)

    set_tracing_disabled(True)  # no network here: nothing is exported
    set_default_openai_client(openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY,
                                                 max_retries=0), use_for_tracing=False)
    cities = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city.

        Args:
            city: the city's name.
        """
        cities.append(city)
        return f"It is sunny and 21 degrees Celsius in {city}."

    agent = Agent(name="weather", instructions="You answer questions about the weather.",
                  model=DEFAULT_MODEL, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                               temperature=0, max_tokens=60))

    async def runs():  # one event loop: the client's connections belong to it
        plain = await Runner.run(agent, ASK_WEATHER, max_turns=4)
        called = list(cities)
        # chained by previous_response_id: each turn sends only its new items
        chained = await Runner.run(agent, ASK_WEATHER, max_turns=4, auto_previous_response_id=True)
        streamed = Runner.run_streamed(agent, ASK_WEATHER, max_turns=4)
        kinds = [event.type async for event in streamed.stream_events()]
        return plain, called, chained, streamed, kinds

    result, called, chained, streamed, kinds = asyncio.run(runs())
    assert called and all(isinstance(c, str) and c for c in called)
    calls = [i for i in result.new_items if i.type == "tool_call_item"]
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert len(calls) == len(outputs) == len(called)
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) == len(called) + 1
    assert all(r.response_id.startswith("resp_") for r in result.raw_responses)
    assert chained.final_output == result.final_output
    assert streamed.final_output == result.final_output and "raw_response_event" in kinds
    assert len(cities) == 3 * len(called)


# ---- bad input -----------------------------------------------------------------------------
def _body(**overrides) -> dict:
    return {"model": DEFAULT_MODEL, "input": ASK, "max_output_tokens": 2, **overrides}


def test_bad_input_is_a_4xx_in_openai_shape_naming_the_field(server):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": "{}"}
    cases = [  # (body, status, param, words in the message)
        (_body(input=[{"type": "web_search_call", "id": "ws_1"}]), 400, "input",
         ["input[0].type", "web_search_call"]),
        (_body(input=[{"role": "user", "content": "hi"}, {"type": "telepathy"}]), 400, "input",
         ["input[1].type"]),
        (_body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
         400, "input", ["input[0].content[0].type", "input_image"]),
        (_body(input=[{"role": "user", "content": "hi"},
                      {"type": "function_call_output", "call_id": "call_9", "output": "1"}]),
         400, "input", ["input[1]", "call_9"]),
        (_body(input=[call, {"type": "function_call_output", "call_id": "call_2", "output": "1"}]),
         400, "input", ["call_2"]),
        (_body(input=[{"type": "function_call_output", "output": "1"}]), 400, "input",
         ["input[0].call_id"]),
        (_body(previous_response_id="resp_unknown"), 400, "previous_response_id",
         ["resp_unknown"]),
        (_body(input=[]), 400, "input", []),
        (_body(tools=[{"type": "web_search"}]), 400, "tools", ["web_search"]),
        (_body(tool_choice="required"), 400, "tool_choice", ["needs tools"]),
        (_body(tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), 400,
         "tool_choice", ["nope"]),
        (_body(tools=[WEATHER], tool_choice="required", text={"format": {"type": "json_object"}}),
         400, "text", []),
        (_body(text={"format": {"type": "json_schema", "name": "x"}}), 400, "text", ["schema"]),
        (_body(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}),
         400, "text", []),
        (_body(background=True), 400, "background", ["background"]),
        (_body(conversation="conv_1"), 400, "conversation", ["conversation"]),
        (_body(truncation="auto"), 400, "truncation", ["truncation"]),
        (_body(top_logprobs=2), 400, "top_logprobs", ["top_logprobs"]),
        (_body(include=["message.output_text.logprobs"]), 400, "include", ["logprobs"]),
        (_body(temperature=3), 400, "temperature", []),
        (_body(max_output_tokens=10 ** 9), 400, "max_output_tokens", ["max_output_tokens"]),
        (_body(frequency_penalty=1), 400, "frequency_penalty", ["frequency_penalty"]),
        (_body(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata", []),
        (_body(model="gpt-4"), 404, "model", ["gpt-4"]),
        (_body(input="x" * (10 << 20)), 413, None, ["limit"]),
        (_body(stream=True, tool_choice="required"), 400, "tool_choice", []),
        (_body(stream=True, max_output_tokens=10 ** 9), 400, "max_output_tokens", []),
    ]
    for body, status, param, words in cases:
        response = server.post("/v1/responses", body)
        error = error_of(response, status, param if param is not None else "any")
        assert all(w in error["message"] for w in words), (body.get("input"), error)
        assert response.headers["content-type"].startswith("application/json")
    for path, method in (("/v1/responses/resp_unknown", requests.get),
                         ("/v1/responses/resp_unknown", requests.delete)):
        error = error_of(method(server.base + path, timeout=30, headers={
            "Authorization": f"Bearer {API_KEY}"}), 404, "response_id")
        assert "resp_unknown" in error["message"]
    error_of(requests.get(server.base + "/v1/responses/resp_x", timeout=30), 401)
    # the hints OpenAI takes as such are accepted
    ok = server.post("/v1/responses", _body(
        reasoning={"effort": "low", "summary": "auto"}, user="u1", safety_identifier="s1",
        prompt_cache_key="k", prompt_cache_retention="24h", service_tier="auto",
        text={"format": {"type": "text"}, "verbosity": "low"}, max_tool_calls=3,
        include=["reasoning.encrypted_content"], truncation="disabled", background=False,
        top_logprobs=0, stream_options={"include_obfuscation": False}, parallel_tool_calls=True,
        metadata={"run": "1"}, store=False))
    assert ok.status_code == 200, ok.text
    assert ok.json()["metadata"] == {"run": "1"} and ok.json()["user"] == "u1"


def test_openapi_describes_the_responses_routes(server):
    spec = requests.get(server.base + "/openapi.json", timeout=30).json()
    create_ = spec["paths"]["/v1/responses"]["post"]
    assert create_["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ResponsesRequest")
    assert "text/event-stream" in create_["responses"]["200"]["content"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(create_["responses"])
    assert {"get", "delete"} <= set(spec["paths"]["/v1/responses/{response_id}"])
    schemas = spec["components"]["schemas"]
    assert schemas["ResponsesRequest"]["properties"]["model"]["enum"] == [DEFAULT_MODEL]
    assert "ResponseStreamEvent" in schemas


# ---- failures mid-stream --------------------------------------------------------------------
def test_an_error_mid_stream_is_an_error_event_then_response_failed(server):
    """A request that fails on the engine thread while it streams (chaos poison): an `error`
    event with the public sentence and the response's id, then `response.failed`; nothing is
    stored, and the engine serves on."""
    import ray

    stream = create(server, input=LONG, max_output_tokens=200, temperature=0, stream=True)
    events = []
    for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta" and len(events) == 5:
            ray.get(server.engine.poison.remote(events[0].response.id), timeout=60)
    response_id = events[0].response.id
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"], collapsed(events)
    error, failed = events[-2], events[-1]
    assert error.code == "internal_error" and response_id in error.message
    assert "Traceback" not in error.message and "pid" not in error.message
    assert failed.response.status == "failed" and failed.response.id == response_id
    assert failed.response.error.code == "internal_error"
    with pytest.raises(openai.NotFoundError):
        server.client.responses.retrieve(response_id)
    assert create(server, input=ASK, max_output_tokens=3).status in ("completed", "incomplete")


# ---- an engine death mid-stream (last: the engine is replaced) -------------------------------
def test_a_streamed_response_outlives_the_engine(server):
    """SIGKILL the engine actor while a response streams: its request journal resumes it on
    the new engine, and the events go on with no gap: the same text as without the failure,
    one sequence, every event in order."""
    from cluster.tools import chaos

    kwargs = dict(input=LONG, max_output_tokens=200, temperature=0)
    whole = create(server, **kwargs)
    assert whole.usage.output_tokens > 100  # the engine dies early in it
    events, killed = [], False
    for event in create(server, stream=True, **kwargs):
        events.append(event)
        if not killed and sum(e.type == "response.output_text.delta" for e in events) == 8:
            chaos.kill_engine(NAME, NAME)
            killed = True
    assert killed
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert collapsed(events) == TEXT_EVENTS + [f"response.{whole.status}"]
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        whole.output_text)
    assert final.usage.output_tokens == whole.usage.output_tokens
