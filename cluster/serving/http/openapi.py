"""The API's OpenAPI description: the error responses every route may give, a streaming
route's server-sent events, and the deployment's model id."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cluster.serving.http.protocol import ChatCompletionChunk, ErrorResponse
from cluster.serving.http.responses_protocol import ResponseStreamEvent

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def streamed_responses(model: type[BaseModel]) -> dict:
    """FastAPI ``responses`` of a route that can stream: each server-sent event's ``data`` is
    a ``model`` as JSON (or an error, should the engine fail mid-stream), the last one
    ``[DONE]``. (Open API 3.1: an event-stream media type's schema describes one event.)"""
    def event(data: dict) -> dict:
        return {"type": "object", "required": ["data"], "properties": {"data": data}}

    def json_of(name: str) -> dict:
        return event({"type": "string", "contentMediaType": "application/json",
                      "contentSchema": {"$ref": f"#/components/schemas/{name}"}})

    schema = {"anyOf": [json_of(model.__name__), json_of("ErrorResponse"),
                        event({"const": "[DONE]"})]}
    return {200: {"content": {"text/event-stream": {"schema": schema}}}, **ERROR_RESPONSES}


def finish_openapi(schema: dict, model: str) -> dict:
    """Add the schemas of the chat chunks and of the Responses API's events (only streams
    refer to them), and say which ``model`` the deployment accepts (others get 404)."""
    components = schema["components"]["schemas"]
    for streamed in (ChatCompletionChunk, ResponseStreamEvent):
        if streamed.__name__ not in components:
            _, defs = models_json_schema([(streamed, "serialization")],
                                         ref_template="#/components/schemas/{model}")
            for name, definition in defs["$defs"].items():
                components.setdefault(name, definition)
    for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
        components[name]["properties"]["model"]["enum"] = [model]
    return schema
