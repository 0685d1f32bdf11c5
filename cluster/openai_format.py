"""Engine-service events turned into OpenAI responses, and errors in OpenAI's shape.

The service (:mod:`cluster.engine_service`) streams ``delta`` events and ends each
request with a ``final`` event or an ``error`` event; the functions here build the
:mod:`cluster.openai_protocol` objects from them. A choice's index is
``prompt_index * n + index``, as in OpenAI's API. :class:`Guard` answers API-key and
body-size errors before a route reads the body.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cluster.openai_protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
    CompletionResponse, ErrorDetail, ErrorResponse, PromptTokensDetails, TopLogprob, Usage)

RETRY_AFTER_S = 5
MAX_DRAIN_BYTES = 64 << 20  # read (and drop) at most this much of a refused body
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 500: "internal_error", 503: "service_unavailable"}
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry = retry or status == 503

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=_TYPES.get(self.status, "invalid_request_error"),
                             param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.retry else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_event(cls, event: dict, param: str | None = None) -> ApiError:
        """An ``error`` event of the service; ``param`` names the input when the event does not."""
        kind, message = event.get("kind"), str(event.get("message") or "request failed")
        if kind == "bad_request":
            code = "context_length_exceeded" if "the prompt has" in message else None
            return cls(400, message, event.get("param") or param, code)
        if kind == "unavailable":
            return cls(503, message, code="engine_unavailable")
        return cls(500, message, code="internal_error")


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400, naming the first offending field."""
    errors = list(exc.errors())
    kinds = {e.get("type") for e in errors}
    if "json_invalid" in kinds:
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return ApiError(400, f"the body is not valid JSON: {detail.get('ctx', {}).get('error', '')}",
                        code="invalid_json")
    unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        return ApiError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field")
    whole = [e for e in errors if tuple(e.get("loc", ())) == ("body",)]
    if whole and whole[0].get("type") != "value_error":
        return ApiError(400, "the body must be a JSON object: " + whole[0].get("msg", ""))
    parts, param = [], None
    for e in errors[:6]:
        loc = [str(x) for x in e.get("loc", ())[1:]]
        param = param or (loc[0] if loc else None)
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return ApiError(400, "; ".join(parts), param, "invalid_value")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else _MIN_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def completion_logprobs(entries: list[dict], offset: int = 0) -> CompletionLogprobs:
    """The completions shape: parallel lists, ``top_logprobs`` one dict per token
    (the top N by text, plus the sampled token); ``text_offset`` counts from ``offset``."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        out.tokens.append(e["token"])
        out.token_logprobs.append(_logprob(e["logprob"]))
        top = {t["token"]: _logprob(t["logprob"]) for t in e.get("top") or []}
        top.setdefault(e["token"], _logprob(e["logprob"]))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e["token"])
    return out


def chat_logprobs(entries: list[dict]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e["token"], logprob=_logprob(e["logprob"]), bytes=e.get("bytes"),
                         top_logprobs=[TopLogprob(token=t["token"], logprob=_logprob(t["logprob"]),
                                                  bytes=t.get("bytes")) for t in e.get("top") or []])
        for e in entries])


@dataclass
class Meta:
    """What every response object of one request shares."""

    id: str
    created: int
    model: str
    n: int = 1

    def index(self, prompt_index: int, event: dict) -> int:
        return prompt_index * self.n + int(event["index"])


def total_usage(finals: list[dict]) -> Usage:
    return usage(sum(f["prompt_tokens"] for f in finals), sum(f["completion_tokens"] for f in finals),
                 sum(f.get("cached_tokens", 0) for f in finals))


def completion_response(meta: Meta, finals: list[dict]) -> CompletionResponse:
    """``finals``: one ``final`` event per prompt, in prompt order."""
    choices = []
    for p, final in enumerate(finals):
        for o in final["outputs"]:
            lp = completion_logprobs(o["logprobs"]) if o.get("logprobs") is not None else None
            choices.append(CompletionChoice(index=meta.index(p, o), text=o["text"], logprobs=lp,
                                            finish_reason=o["finish_reason"]))
    choices.sort(key=lambda c: c.index)
    return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=choices,
                              usage=total_usage(finals))


def chat_response(meta: Meta, final: dict) -> ChatCompletionResponse:
    choices = [ChatChoice(index=o["index"], message=ChatResponseMessage(content=o["text"]),
                          logprobs=chat_logprobs(o["logprobs"]) if o.get("logprobs") is not None
                          else None, finish_reason=o["finish_reason"])
               for o in sorted(final["outputs"], key=lambda o: o["index"])]
    return ChatCompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                  choices=choices, usage=total_usage([final]))


class CompletionStream:
    """Server-sent events of a streamed completion: one chunk per delta with text,
    logprobs or a finish reason; a last chunk with usage and no choices when asked."""

    def __init__(self, meta: Meta, include_usage: bool):
        self.meta, self.include_usage = meta, include_usage
        self.offsets: dict[int, int] = {}
        self.finals: list[dict] = []

    def start(self) -> list[bytes]:
        return []

    def _worth_sending(self, event: dict) -> bool:
        """Keeps final events for the usage chunk; False for events with nothing to send."""
        if event["type"] == "final":
            self.finals.append(event)
            return False
        return bool(event["text"] or event["finish_reason"] or event.get("logprobs"))

    def on_event(self, prompt_index: int, event: dict) -> list[bytes]:
        if not self._worth_sending(event):
            return []
        index = self.meta.index(prompt_index, event)
        lp = None
        if event.get("logprobs") is not None:
            lp = completion_logprobs(event["logprobs"], self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
        choice = CompletionChoice(index=index, text=event["text"], logprobs=lp,
                                  finish_reason=event["finish_reason"])
        return [self._chunk([choice])]

    def _chunk(self, choices: list, usage_: Usage | None = None) -> bytes:
        chunk = CompletionResponse(id=self.meta.id, created=self.meta.created, model=self.meta.model,
                                   choices=choices, usage=usage_)
        return sse(chunk.model_dump(mode="json"))

    def end(self) -> list[bytes]:
        return [self._chunk([], total_usage(self.finals))] if self.include_usage else []


class ChatStream(CompletionStream):
    """Chat chunks: each choice opens with ``{"role": "assistant", "content": ""}``."""

    def start(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                             for i in range(self.meta.n)])]

    def on_event(self, prompt_index: int, event: dict) -> list[bytes]:
        if not self._worth_sending(event):
            return []
        lp = chat_logprobs(event["logprobs"]) if event.get("logprobs") is not None else None
        delta = ChatDelta(content=event["text"]) if event["text"] else ChatDelta()
        choice = ChatChunkChoice(index=int(event["index"]), delta=delta, logprobs=lp,
                                 finish_reason=event["finish_reason"])
        return [self._chunk([choice])]

    def _chunk(self, choices: list, usage_: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model,
                                    choices=choices, usage=usage_).model_dump(mode="json")
        for choice in chunk["choices"]:  # OpenAI leaves unset delta fields out
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(chunk)


# ---- HTTP guard: API keys and body size, before a route reads anything ---------------------
class Guard:
    """ASGI middleware: when keys are set, 401 without a valid ``Authorization: Bearer`` key
    on every path but :data:`OPEN_PATHS` (probes, scrapers, the API's description); 413 for
    a body over ``max_body_bytes`` (declared or actually sent)."""

    def __init__(self, app, max_body_bytes: int, api_keys: tuple[str, ...] = ()):
        self.app, self.limit = app, max_body_bytes
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if self.keys and path not in OPEN_PATHS and not self._authorized(headers):
            return await _send(send, ApiError(401, "a valid API key is required: send "
                                              "'Authorization: Bearer <key>'", code="invalid_api_key"))
        limit = self.limit
        try:
            declared = int(headers.get("content-length", b"0"))
        except ValueError:
            return await _send(send, ApiError(400, "Content-Length is not a number"))
        if declared > limit:
            await _drain(receive, declared)
            return await _send(send, _too_large(limit))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                if more:
                    await _drain(receive, MAX_DRAIN_BYTES)
                return await _send(send, _too_large(limit))
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_again, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        ok = False
        for key in self.keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over the server's limit of {limit} bytes",
                    code="request_too_large")


async def _drain(receive, at_most: int) -> None:
    seen = 0
    while seen < min(at_most, MAX_DRAIN_BYTES):
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send(send, error: ApiError) -> None:
    response = error.response()
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
