"""vLLM's tokenizer endpoints: ``POST /tokenize`` and ``POST /detokenize``.

``POST /tokenize`` takes vLLM's two forms: ``{"prompt": text, "add_special_tokens": true}``,
or a conversation ``{"messages": [...], "add_generation_prompt": true,
"continue_final_message": false, "add_special_tokens": false, "tools": [...]}`` (the messages
and tools of ``/v1/chat/completions``); both take ``model`` (optional; another than the served
one is a 404) and ``return_token_strs``. It answers ``{"count", "max_model_len", "tokens",
"token_strs"}``. ``POST /detokenize`` takes ``{"tokens": [ids]}`` and answers ``{"prompt":
text}`` (special tokens included, as ``tokenizer.decode`` gives them).

The engine service tokenizes (its tokenizer pool, :mod:`cluster.engine.tokenization`), with
the calls its admission makes of a request's prompt: at the defaults, the ids are those a
completion (``prompt``) or chat completion (``messages``) request is admitted with. Bad input
is a 400 naming the field: both or neither of ``prompt`` and ``messages``, chat options with a
prompt, ``add_generation_prompt`` and ``continue_final_message`` both true, text that is not
valid Unicode (a lone surrogate), token ids outside the model's vocabulary.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from cluster.contract.events import raise_if_error
from cluster.serving.http.format import ApiError, api_error, internal_error, validation_error
from cluster.serving.http.openapi import ERROR_RESPONSES
from cluster.serving.http.protocol import STRICT, ChatMessage, TokenId, Tool

if TYPE_CHECKING:
    from cluster.serving.http.app import OpenAIServer

TOKENIZER_TIMEOUT_S = 60.0  # a 4 MiB body (the default limit) tokenizes in about a second
_MODEL = Field(None, description="the served model's id (see /v1/models); optional")
_TOKEN_STRS = Field(False, description="also return each token's string in the vocabulary")


class TokenizeCompletionRequest(BaseModel):
    model_config = STRICT
    model: str | None = _MODEL
    prompt: str
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens "
                                     "(e.g. BOS), as a completion's prompt gets them")
    return_token_strs: bool | None = _TOKEN_STRS


class TokenizeChatRequest(BaseModel):
    model_config = STRICT
    model: str | None = _MODEL
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = Field(True, description="end with the header of the "
                                        "assistant's answer, as a chat completion's prompt "
                                        "does (default false with continue_final_message)")
    continue_final_message: bool = Field(False, description="end inside the last message "
                                         "(no end of turn): the model continues it")
    add_special_tokens: bool = Field(False, description="add the tokenizer's special tokens "
                                     "(e.g. BOS) on top of the chat template's")
    return_token_strs: bool | None = _TOKEN_STRS
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="functions the model may call, rendered as a chat completion's are")

    @model_validator(mode="after")
    def _ending(self) -> TokenizeChatRequest:
        if self.continue_final_message and "add_generation_prompt" not in self.model_fields_set:
            self.add_generation_prompt = False
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = _MODEL
    tokens: list[TokenId] = Field(description="token ids of the model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str


_FORMS = (TokenizeCompletionRequest, TokenizeChatRequest)
_CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "tools")


def parse_tokenize(raw: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The request in its form (``messages``: a conversation; else text), or a 400 naming the
    field at fault (validated here, not by FastAPI: its union errors name the form, not the
    field)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON (or not UTF-8): {exc}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    if "messages" in data and "prompt" in data:
        raise ApiError(400, "give prompt (text) or messages (a conversation), not both",
                       "prompt", "invalid_value")
    if "messages" not in data:
        if "prompt" not in data:
            raise ApiError(400, "give prompt (text) or messages (a conversation)", "prompt",
                           "invalid_value")
        given = [name for name in _CHAT_ONLY if name in data]
        if given:
            raise ApiError(400, f"{given[0]} goes with messages, not with prompt", given[0],
                           "invalid_value")
    form = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
    try:
        body = form.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise validation_error(RequestValidationError(errors)) from None
    if form is TokenizeChatRequest and body.continue_final_message and body.add_generation_prompt:
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be "
                       "true (the one continues the last message, the other starts an answer "
                       "after it)", "continue_final_message", "invalid_value")
    return body


def engine_request(body: TokenizeCompletionRequest | TokenizeChatRequest) -> tuple[dict, str]:
    """What the engine service's ``tokenize`` takes, and the field that carried the input."""
    common = {"add_special_tokens": body.add_special_tokens,
              "return_token_strs": bool(body.return_token_strs)}
    if isinstance(body, TokenizeCompletionRequest):
        return {"prompt": body.prompt, **common}, "prompt"
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    return {"messages": [m.as_template_message() for m in body.messages], "tools": tools,
            "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message, **common}, "messages"


async def _ask(server: OpenAIServer, method: str, arg, field: str) -> dict:
    """An engine service's answer to a tokenizer call (any engine: they share the
    checkpoint), or the ApiError of its error."""
    await server.require_ready()  # a 503 saying why while the engines start (as generation)
    service = server.services[server.router.pick([])]
    try:
        result = await asyncio.wait_for(getattr(service, method).remote(arg), TOKENIZER_TIMEOUT_S)
    except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
        raise internal_error(503, "engine_unavailable", None,
                             f"the engine service does not answer {method}", exc) from exc
    if result.get("type") != "error":
        return result
    try:
        raise_if_error(result)
    except Exception as exc:
        raise api_error(exc, field) from exc
    raise AssertionError("raise_if_error raises on an error event")


def register(app: FastAPI, server: OpenAIServer, keyed: list) -> None:
    """Add the routes to ``app``, and their request schemas to its OpenAPI description."""

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=keyed,
              responses=ERROR_RESPONSES, summary="Tokenize a prompt or a conversation",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"anyOf": [
                      {"$ref": f"#/components/schemas/{form.__name__}"} for form in _FORMS]}}}}})
    async def tokenize(request: Request):
        body = parse_tokenize(await request.body())
        if body.model is not None:
            server.check_model(body.model)
        arg, field = engine_request(body)
        out = await _ask(server, "tokenize", arg, field)
        return TokenizeResponse(count=len(out["tokens"]), **out)

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=keyed,
              responses=ERROR_RESPONSES, summary="Turn token ids into text")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            server.check_model(body.model)
        return DetokenizeResponse(**await _ask(server, "detokenize", body.tokens, "tokens"))

    generate = app.openapi
    app.openapi = lambda: _with_forms(generate(), server.model)


def _with_forms(schema: dict, model: str) -> dict:
    """The two forms of ``/tokenize``'s body (only its anyOf refers to them), each request's
    ``model`` the served one or null."""
    components = schema["components"]["schemas"]
    if _FORMS[0].__name__ not in components:
        _, defs = models_json_schema([(form, "validation") for form in _FORMS],
                                     ref_template="#/components/schemas/{model}")
        for name, definition in defs["$defs"].items():
            components.setdefault(name, definition)
    for form in (*_FORMS, DetokenizeRequest):
        components[form.__name__]["properties"]["model"] = {
            "anyOf": [{"type": "string", "enum": [model]}, {"type": "null"}], "default": None,
            "description": "the served model's id (see /v1/models); optional"}
    return schema
