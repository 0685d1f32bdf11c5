"""The Responses API: ``POST /v1/responses`` (streamed or not), ``GET`` and ``DELETE
/v1/responses/{response_id}``.

A request takes the chat completions' path: its ``input`` items (after the stored
conversation of ``previous_response_id``, with ``instructions`` first) become chat messages,
its fields a :class:`cluster.serving.http.protocol.ChatCompletionRequest`'s, so the chat
template, the tool rendering, the grammar of ``text.format`` and of ``tool_choice``
required or named, and the tool-call parser are the chat completions' own. It is sent and
read through the API replica's :meth:`OpenAIServer.collect` or :meth:`OpenAIServer.stream`:
the same request journal, so a stream resumes after an engine death as a chat stream does.
Its output becomes items (:mod:`cluster.serving.http.responses_format`).

A stored response (``store``, default true) is kept with its conversation (input and
output as chat messages, without its instructions, which OpenAI does not carry over) in the
deployment's store (:mod:`cluster.serving.http.store`), before the client has the response.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cluster.serving.http import store
from cluster.serving.http.format import ApiError, ResponseInfo, ToolMode
from cluster.serving.http.openapi import ERROR_RESPONSES, streamed_responses
from cluster.serving.http.protocol import ChatCompletionRequest
from cluster.serving.http.responses_format import (ResponsesStream, as_messages, dump, new_id,
                                                   output_items, response_object, status_of,
                                                   usage)
from cluster.serving.http.responses_items import FunctionCallItem, FunctionCallOutputItem
from cluster.serving.http.responses_protocol import (DeletedResponse, Response,
                                                     ResponsesRequest, ResponseStreamEvent)
from cluster.serving.http.tools import engine_fields

log = logging.getLogger("shardlm.serve")
FIELD = "input"  # the request's field that carries the prompt (errors about it name it)


def conversation(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    """``history`` (a stored conversation) and the input, as chat messages. A
    ``function_call_output`` must answer a call made before it (a 400 naming its place)."""
    if isinstance(body.input, str):
        return history + [{"role": "user", "content": body.input}]
    messages = list(history)
    called = {c["id"] for m in history for c in m.get("tool_calls") or []}
    for i, item in enumerate(body.input):
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            called.add(item.call_id)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # one turn: text, then calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise ApiError(400, f"input[{i}]: this function_call_output answers call_id "
                               f"{item.call_id!r}, which no function_call before it made",
                               FIELD, "invalid_value")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text()})
        else:
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_request(body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat completion this response is (the same checks, parameters and tools)."""
    fields = {"model": body.model, "messages": messages, "temperature": body.temperature,
              "top_p": body.top_p, "max_completion_tokens": body.max_output_tokens,
              "user": body.user}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": t.model_dump(
            exclude_none=True, exclude={"type"})} for t in body.tools]
        mode = body.tool_mode
        fields["tool_choice"] = ({"type": "function", "function": {"name": body.tool_choice.name}}
                                 if mode == "named" else mode)
        fields["parallel_tool_calls"] = body.parallel_tool_calls is not False
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name, "schema": fmt.schema_}
        fields["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt is not None:
        fields["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:  # what the Responses checks let through (a message's text)
        first = exc.errors()[0]
        raise ApiError(400, f"{FIELD}: {first.get('msg', 'invalid')}", FIELD,
                       "invalid_value") from None


def engine_request(response_id: str, chat: ChatCompletionRequest) -> tuple[dict, ToolMode]:
    """The engine request of ``chat`` and how its output is read (as the chat route does)."""
    params = chat.sampling_params(chat.max_new_tokens(), None)
    tools, constraint = engine_fields(chat)
    if constraint is not None:  # tool_choice required or named
        params["structured_outputs"] = constraint
    request = dict(request_id=response_id, params=params, tools=tools,
                   messages=[m.as_template_message() for m in chat.messages])
    calls = ToolMode(chat.tool_mode if tools else "none",
                     chat.tool_choice.function.name if chat.tool_mode == "named" else None)
    return request, calls


# ---- the store ---------------------------------------------------------------------------
def unavailable(response_id: str | None = None) -> ApiError:
    return ApiError(503, "the response store is unavailable (it is being restarted); retry "
                    "later", code="store_unavailable", request_id=response_id)


async def load(server, response_id: str, request_id: str | None = None) -> dict | None:
    try:
        record = await store.call(server.store.get, response_id)
    except store.StoreUnavailable:
        raise unavailable(request_id) from None
    return json.loads(record) if record is not None else None


async def save(server, response: Response, messages: list[dict]) -> None:
    """Keep ``response`` and its conversation; a store that cannot keep it is logged (the
    client has its response; a later GET or continuation of it is a 404 / 400)."""
    output = dump(response)
    record = json.dumps({"response": output, "conversation": messages + as_messages(
        output["output"])}, separators=(",", ":"), ensure_ascii=False).encode()
    try:
        kept = await store.call(server.store.put, response.id, record)
    except store.StoreUnavailable:
        kept = False
    if not kept:
        log.warning("response %s (%d bytes) was not stored: the store is unavailable or the "
                    "record is over deployment.response_store_bytes", response.id, len(record))


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id {response_id!r} not found (unknown, deleted, or "
                    "dropped from the bounded store)", "response_id", "response_not_found")


GRAMMAR_PARAMS = ("structured_outputs", "json", "json_object", "regex", "grammar", "choice")


def renamed(error: ApiError, body: ResponsesRequest) -> ApiError:
    """An engine error's parameter by this API's name: the token limit is
    ``max_output_tokens``, an output constraint ``text`` (its format) or ``tools`` (the
    constraint of tool_choice required or named)."""
    if error.param == "max_tokens":
        error.param = "max_output_tokens"
        error.message = error.message.replace("max_tokens", "max_output_tokens")
    elif error.param in GRAMMAR_PARAMS:
        error.param = "tools" if body.tool_mode in ("required", "named") else "text"
    return error


# ---- routes ------------------------------------------------------------------------------
async def create(server, body: ResponsesRequest):
    server.check_model(body.model)
    meta = ResponseInfo(new_id("resp"), int(time.time()), server.model)
    await server.require_ready(meta.id)
    history = []
    if body.previous_response_id is not None:
        record = await load(server, body.previous_response_id, meta.id)
        if record is None:
            raise ApiError(400, f"Previous response with id {body.previous_response_id!r} not "
                           "found (unknown, deleted, not stored, or dropped from the bounded "
                           "store)", "previous_response_id", "previous_response_not_found")
        history = record["conversation"]
    messages = conversation(body, history)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    request, calls = engine_request(meta.id, chat_request(body, system + messages))
    stored = body.store is not False

    async def done(response: Response) -> None:
        if stored:
            await save(server, response, messages)

    try:
        if body.stream:
            return await server.stream([request], ResponsesStream(meta, body, calls, done), FIELD)
        (final,) = await server.collect([request], FIELD, meta.id)
    except ApiError as exc:
        raise renamed(exc, body) from None
    (out,) = final["outputs"]
    response = response_object(meta, body, output_items(out["text"], out["finish_reason"], calls),
                               status_of(out["finish_reason"]), usage([final]))
    await done(response)
    return JSONResponse(dump(response))


async def retrieve(server, response_id: str):
    record = await load(server, response_id)
    if record is None:
        raise not_found(response_id)
    return JSONResponse(record["response"])


async def delete(server, response_id: str):
    try:
        deleted = await store.call(server.store.delete, response_id)
    except store.StoreUnavailable:
        raise unavailable() from None
    if not deleted:
        raise not_found(response_id)
    return DeletedResponse(id=response_id)


def add_routes(app: FastAPI, server, keyed: list, while_connected) -> None:
    """The routes on ``app``; ``keyed``: the API-key dependency; ``while_connected``: app.py's
    watch for a client that goes away before a non-streamed answer."""

    @app.post("/v1/responses", response_model=Response, dependencies=keyed,
              responses=streamed_responses(ResponseStreamEvent), summary="Create a response")
    async def create_response(body: ResponsesRequest, request: Request):
        return await while_connected(request, create(server, body))

    @app.get("/v1/responses/{response_id}", response_model=Response, dependencies=keyed,
             responses=ERROR_RESPONSES, summary="A stored response")
    async def get_response(response_id: str):
        return await retrieve(server, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=DeletedResponse,
                dependencies=keyed, responses=ERROR_RESPONSES, summary="Delete a stored response")
    async def delete_response(response_id: str):
        return await delete(server, response_id)
