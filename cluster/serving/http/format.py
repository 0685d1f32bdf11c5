"""Engine-service events turned into OpenAI responses, and errors in OpenAI's shape.

The service (:mod:`cluster.serving.service`) streams ``delta`` events and ends each
request with a ``final`` event or an ``error`` event; the functions here build the
:mod:`cluster.serving.http.protocol` objects from them. A choice's index is
``prompt_index * n + index``, as in OpenAI's API. :func:`api_error` maps the typed errors
of :mod:`cluster.contract.errors` to HTTP statuses, by class and kind.

An error that is not the client's fault (5xx, and the same errors inside a stream) says only
a fixed public sentence and a request id: its own text can hold worker names, pids, node
addresses and Ray tracebacks (``ray::Worker.execute_step() (pid=..., ip=...)``), which are
the operators' business. :func:`api_error` logs the whole of it (``shardlm.serve``) under
that id, and the response names the id in its message and in ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.contract.errors import EngineUnavailable, RequestError
from cluster.serving.http import tools
from cluster.serving.http.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
    CompletionResponse, ErrorDetail, ErrorResponse, PromptTokensDetails, TopLogprob, Usage)

log = logging.getLogger("shardlm.serve")
RETRY_AFTER_S = 5
REQUEST_ID_HEADER = "X-Request-Id"
# what a client is told of an error that is not its own (by its code): fixed sentences, so
# that no exception text reaches it
PUBLIC_MESSAGES = {
    "engine_unavailable": "the engine is unavailable (restarting, overloaded or failed); "
                          "retry later",
    "internal_error": "internal error",
}
PROMPT_INPUTS = ("prompt", "prompt_token_ids", "messages")  # the engine's names of a prompt
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 500: "internal_error", 503: "service_unavailable"}
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry: bool = False, request_id: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry = retry or status == 503
        # the id the server's log names this error by (the message quotes it, so that it
        # survives clients that keep the body and drop the headers)
        self.request_id = request_id

    def body(self) -> dict:
        message = self.message
        if self.request_id is not None:
            message += f" (request id {self.request_id})"
        detail = ErrorDetail(message=message, type=_TYPES.get(self.status, "invalid_request_error"),
                             param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.retry else {}
        if self.request_id is not None:
            headers[REQUEST_ID_HEADER] = self.request_id
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def new_request_id() -> str:
    """An id for an error of a request that has none of its own yet (no completion id)."""
    return f"req-{uuid.uuid4().hex}"


def internal_error(status: int, code: str, request_id: str | None, what: str,
                   exc: BaseException | None = None) -> ApiError:
    """The public answer to an error that is not the client's: ``what`` happened and the
    exception (text and traceback, Ray's remote one included) go to the log under the
    request id, the client gets the fixed sentence of ``code`` and the id."""
    request_id = request_id or new_request_id()
    level = logging.WARNING if status == 503 else logging.ERROR
    log.log(level, "request %s: %s (answered %d %s)", request_id, what, status, code,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
    return ApiError(status, PUBLIC_MESSAGES[code], code=code, request_id=request_id)


def api_error(exc: BaseException, field: str, request_id: str | None = None) -> ApiError:
    """The HTTP answer to an error of the engine or its stream: a RequestError is 400 with
    its kind as the code, its own message and its parameter (the engine's prompt inputs, or
    none, named as the request's ``field`` that carried the prompt): the client's own input,
    said precisely. EngineUnavailable is 503 and anything else 500, each with a fixed public
    message and ``request_id`` (made if None); their text is logged (:func:`internal_error`)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        param = field if exc.param in (None, *PROMPT_INPUTS) else exc.param
        return ApiError(400, exc.message, param, exc.kind)
    if isinstance(exc, EngineUnavailable):
        return internal_error(503, "engine_unavailable", request_id,
                              f"the engine is unavailable: {exc}", exc)
    return internal_error(500, "internal_error", request_id,
                          f"failed: {type(exc).__name__}: {exc}", exc)


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


class EventStream(StreamingResponse):
    """A server-sent event stream whose client must keep reading: a chunk its connection has
    not taken within ``stall_timeout_s`` (the server's write buffer for it stays full: uvicorn
    holds ``send`` until it drains) ends the response: ``on_stall()`` is called and the body
    closed (its ``finally`` aborts the requests), and the server closes the connection once it
    has flushed what it holds. Behind Serve's proxy ``send`` never waits (the proxy takes every
    chunk, and buffers it for its client), so this never fires there."""

    media_type = "text/event-stream"

    def __init__(self, content, stall_timeout_s: float, on_stall: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.stall_timeout_s, self.on_stall = stall_timeout_s, on_stall

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if not await self._send(send, chunk, True):
                return  # the response left incomplete: the server closes the connection
        await self._send(send, b"", False)

    async def _send(self, send, chunk: bytes, more: bool) -> bool:
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
            return True
        except TimeoutError:
            self.on_stall()
            await self.body_iterator.aclose()
            return False


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
        out.text_offset.append(offset)
        offset += len(e["token"])
        if e["logprob"] is None:  # an echoed prompt's first token
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_logprob(e["logprob"]))
        top = {t["token"]: _logprob(t["logprob"]) for t in e.get("top") or []}
        top.setdefault(e["token"], _logprob(e["logprob"]))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: list[dict]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e["token"], logprob=_logprob(e["logprob"]), bytes=e.get("bytes"),
                         top_logprobs=[TopLogprob(token=t["token"], logprob=_logprob(t["logprob"]),
                                                  bytes=t.get("bytes")) for t in e.get("top") or []])
        for e in entries])


@dataclass
class ResponseInfo:
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


def echoed(event: dict, text: str, entries: list[dict] | None) -> tuple[str, list[dict] | None]:
    """A choice's text and logprob entries, after the prompt's when the event carries them
    (``echo``)."""
    if entries is not None and event.get("prompt_logprobs") is not None:
        entries = event["prompt_logprobs"] + entries
    return event.get("prompt_text", "") + text, entries


def completion_response(meta: ResponseInfo, finals: list[dict]) -> CompletionResponse:
    """``finals``: one ``final`` event per prompt, in prompt order."""
    choices = []
    for p, final in enumerate(finals):
        for o in final["outputs"]:
            text, entries = echoed(final, o["text"], o.get("logprobs"))
            lp = completion_logprobs(entries) if entries is not None else None
            choices.append(CompletionChoice(index=meta.index(p, o), text=text, logprobs=lp,
                                            finish_reason=o["finish_reason"]))
    choices.sort(key=lambda c: c.index)
    return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=choices,
                              usage=total_usage(finals))


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output is read: ``mode`` none, auto, required or named (see
    :mod:`cluster.serving.http.tools`); ``name``: the named function."""

    mode: str = "none"
    name: str | None = None


def chat_response(meta: ResponseInfo, final: dict, calls: ToolMode = ToolMode()
                  ) -> ChatCompletionResponse:
    choices = []
    for o in sorted(final["outputs"], key=lambda o: o["index"]):
        content, tool_calls = tools.parse(calls.mode, o["text"], calls.name)
        choices.append(ChatChoice(
            index=o["index"], message=ChatResponseMessage(content=content,
                                                          tool_calls=tool_calls or None),
            logprobs=chat_logprobs(o["logprobs"]) if o.get("logprobs") is not None else None,
            finish_reason=tools.finish_reason(o["finish_reason"], calls.mode, bool(tool_calls))))
    return ChatCompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                  choices=choices, usage=total_usage([final]))


class CompletionStream:
    """Server-sent events of a streamed completion: one chunk per delta with text,
    logprobs or a finish reason; a last chunk with usage and no choices when asked."""

    def __init__(self, meta: ResponseInfo, include_usage: bool):
        self.meta, self.include_usage = meta, include_usage
        self.offsets: dict[int, int] = {}
        self.finals: list[dict] = []  # the final events' token counts (their text was streamed)

    def start(self) -> list[bytes]:
        return []

    def _worth_sending(self, event: dict) -> bool:
        """Keeps final events' counts for the usage chunk; False for events with nothing to
        send."""
        if event["type"] == "final":
            self.finals.append({k: event.get(k, 0) for k in
                                ("prompt_tokens", "completion_tokens", "cached_tokens")})
            return False
        return bool(event["text"] or event["finish_reason"] or event.get("logprobs")
                    or event.get("prompt_text"))

    def on_event(self, prompt_index: int, event: dict) -> list[bytes]:
        if not self._worth_sending(event):
            return []
        index = self.meta.index(prompt_index, event)
        text, entries = echoed(event, event["text"], event.get("logprobs"))
        lp = None
        if entries is not None:
            lp = completion_logprobs(entries, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
        choice = CompletionChoice(index=index, text=text, logprobs=lp,
                                  finish_reason=event["finish_reason"])
        return [self._chunk([choice])]

    def _chunk(self, choices: list, usage_: Usage | None = None) -> bytes:
        chunk = CompletionResponse(id=self.meta.id, created=self.meta.created, model=self.meta.model,
                                   choices=choices, usage=usage_)
        return sse(chunk.model_dump(mode="json"))

    def end(self) -> list[bytes]:
        return [self._chunk([], total_usage(self.finals))] if self.include_usage else []

    async def finish(self) -> list[bytes]:
        """The last chunks, once every request ended: :meth:`end`'s, then ``[DONE]``."""
        return [*self.end(), sse("[DONE]")]

    def error(self, error: ApiError, broken: bool = False) -> list[bytes]:
        """The chunks of an error that ends the stream: its body, then ``[DONE]`` unless the
        stream broke in the making of a chunk (``broken``)."""
        return [sse(error.body())] if broken else [sse(error.body()), sse("[DONE]")]


class ChatStream(CompletionStream):
    """Chat chunks: each choice opens with ``{"role": "assistant", "content": ""}``; with
    tools, its text goes through a :class:`cluster.serving.http.tools.StreamParser`."""

    def __init__(self, meta: ResponseInfo, include_usage: bool, calls: ToolMode = ToolMode()):
        super().__init__(meta, include_usage)
        self.calls = calls
        self.parsers: dict[int, tools.StreamParser] = {}
        self.called: set[int] = set()  # choices that sent a tool call

    def start(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                             for i in range(self.meta.n)])]

    def on_event(self, prompt_index: int, event: dict) -> list[bytes]:
        if not self._worth_sending(event):
            return []
        index = int(event["index"])
        lp = chat_logprobs(event["logprobs"]) if event.get("logprobs") is not None else None
        content, deltas = event["text"] or None, []
        reason = event["finish_reason"]
        if self.calls.mode != "none":
            parser = self.parsers.setdefault(index, tools.StreamParser(*astuple(self.calls)))
            content, deltas = parser.feed(event["text"])
            if reason is not None:
                rest, more = parser.finish()
                content, deltas = _joined(content, rest), deltas + more
            if deltas:
                self.called.add(index)
            reason = tools.finish_reason(reason, self.calls.mode, index in self.called)
        if not (content or deltas or lp or reason):
            return []
        delta = ChatDelta(content=content, tool_calls=deltas or None)
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)
        return [self._chunk([choice])]

    def _chunk(self, choices: list, usage_: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model,
                                    choices=choices, usage=usage_).model_dump(mode="json")
        for choice in chunk["choices"]:  # OpenAI leaves unset delta fields out
            choice["delta"] = _without_nulls(choice["delta"])
        return sse(chunk)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _joined(a: str | None, b: str | None) -> str | None:
    return (a or "") + (b or "") or None
