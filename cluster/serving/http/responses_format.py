"""Engine events as the Responses API's objects: a response's output items (an assistant
``message`` with ``output_text``, ``function_call`` items), the response itself, and its
server-sent events (:class:`ResponsesStream`).

A stream's events, each with the next ``sequence_number`` and named by its ``event:`` line,
come in OpenAI's order: ``response.created``, ``response.in_progress``; per output item
``response.output_item.added``, then for a message ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, and for a function call
``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``;
then ``response.output_item.done``; last ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut it). No ``[DONE]`` follows. An error mid-stream is an ``error``
event followed by ``response.failed``. Tool calls are read as chat completions read them
(:mod:`cluster.serving.http.tools`: whole, or streamed by its StreamParser).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import astuple

from cluster.serving.http import tools
from cluster.serving.http.format import ApiError, CompletionStream, ResponseInfo, ToolMode
from cluster.serving.http.responses_protocol import Response, ResponsesRequest, ResponseUsage


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def event_bytes(event: dict) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def message_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or new_id("msg"), "role": "assistant",
            "status": status, "content": [text_part(text)] if text is not None else []}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_items(text: str, finish_reason: str | None, calls: ToolMode) -> list[dict]:
    """A whole output as items: the message (if any text, or nothing else), then the calls."""
    status = "incomplete" if finish_reason == "length" else "completed"
    content, parsed = tools.parse(calls.mode, text, calls.name)
    items = [message_item(content, status)] if content or not parsed else []
    items += [call_item(c.id, c.function.name, c.function.arguments, status) for c in parsed]
    return items


def as_messages(items: list[dict]) -> list[dict]:
    """Output items as the conversation's next message (chat form): the assistant's text and
    calls."""
    text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    message = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def usage(finals: list[dict]) -> ResponseUsage:
    prompt = sum(f["prompt_tokens"] for f in finals)
    output = sum(f["completion_tokens"] for f in finals)
    return ResponseUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
                         input_tokens_details={"cached_tokens": sum(
                             f.get("cached_tokens", 0) for f in finals)})


def response_object(meta: ResponseInfo, body: ResponsesRequest, output: list[dict],
                    status: str, usage_: ResponseUsage | None = None,
                    error: dict | None = None) -> Response:
    """The response as the API returns (and stores) it; ``status`` in_progress, completed,
    incomplete (cut by max_output_tokens) or failed."""
    text = body.text.model_dump(mode="json", by_alias=True, exclude_none=True) if body.text else {}
    text.setdefault("format", {"type": "text"})
    choice = body.tool_choice or ("auto" if body.tools else "none")
    return Response(
        id=meta.id, created_at=meta.created, status=status, model=meta.model, output=output,
        completed_at=int(time.time()) if status == "completed" else None,
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        error=error, instructions=body.instructions,
        previous_response_id=body.previous_response_id, max_output_tokens=body.max_output_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        tool_choice=choice,
        tools=body.tools or [], text=text, reasoning=body.reasoning,
        store=body.store is not False, metadata=body.metadata or {}, user=body.user,
        usage=usage_)


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def dump(response: Response) -> dict:
    return response.model_dump(mode="json", by_alias=True)


class ResponsesStream(CompletionStream):
    """A response's server-sent events (see the module docstring), from one request's engine
    events. ``on_done`` is awaited with the final response before its last event is sent
    (the store: a GET or a continuation right after the stream finds it)."""

    def __init__(self, meta: ResponseInfo, body: ResponsesRequest, calls: ToolMode,
                 on_done: Callable[[Response], Awaitable[None]]):
        super().__init__(meta, include_usage=False)
        self.body, self.calls, self.on_done = body, calls, on_done
        self.parser = tools.StreamParser(*astuple(calls)) if calls.mode != "none" else None
        self.sequence = 0
        self.items: list[dict] = []  # the output so far (open items hold their text so far)
        self.open: int | None = None  # the output index of the item still being written
        self.by_call: dict[int, int] = {}  # a tool-call delta's index -> its output index
        self.finish_reason: str | None = None

    def _event(self, type_: str, **fields) -> bytes:
        event = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event_bytes(event)

    def _response(self, status: str, **kwargs) -> dict:
        return dump(response_object(self.meta, self.body, self.items, status, **kwargs))

    def start(self) -> list[bytes]:
        snapshot = self._response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def on_event(self, prompt_index: int, event: dict) -> list[bytes]:
        if event["type"] == "final":  # its counts, and its end if no delta said it
            self._worth_sending(event)
            for output in event["outputs"]:
                self.finish_reason = self.finish_reason or output["finish_reason"]
            return []
        if not self._worth_sending(event):
            return []
        self.finish_reason = event["finish_reason"] or self.finish_reason
        return self._output(event["text"], event["finish_reason"] is not None)

    def _output(self, text: str, last: bool) -> list[bytes]:
        if self.parser is None:
            return self._text(text)
        content, deltas = self.parser.feed(text)
        if last:
            rest, more = self.parser.finish()
            self.parser = None
            content, deltas = (content or "") + (rest or ""), deltas + more
        out = self._text(content) if content else []
        for delta in deltas:
            out += self._call(delta)
        return out

    # ---- items -----------------------------------------------------------------------------
    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        out = []
        if self.open is None or self.items[self.open]["type"] != "message":
            out += self._close() + self._open_message()
        item = self.items[self.open]
        item["content"][0]["text"] += text
        out.append(self._event("response.output_text.delta", item_id=item["id"],
                               output_index=self.open, content_index=0, delta=text,
                               logprobs=[]))
        return out

    def _call(self, delta) -> list[bytes]:
        out = []
        if delta.index not in self.by_call:
            out += self._close()
            out += self._add(call_item(delta.id, delta.function.name, "", "in_progress"))
            self.by_call[delta.index] = self.open
        index = self.by_call[delta.index]
        piece = delta.function.arguments or ""
        if piece:
            self.items[index]["arguments"] += piece
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=self.items[index]["id"], output_index=index,
                                   delta=piece))
        return out

    def _open_message(self) -> list[bytes]:
        out = self._add(message_item(None, "in_progress"))
        item = self.items[self.open]
        item["content"] = [text_part("")]
        return out + [self._event("response.content_part.added", item_id=item["id"],
                                  output_index=self.open, content_index=0, part=text_part(""))]

    def _add(self, item: dict) -> list[bytes]:
        self.items.append(item)
        self.open = len(self.items) - 1
        return [self._event("response.output_item.added", output_index=self.open, item=item)]

    def _close(self) -> list[bytes]:
        """The open item's closing events (it is then whole)."""
        if self.open is None:
            return []
        index, item = self.open, self.items[self.open]
        self.open = None
        item["status"] = status_of(self.finish_reason)
        if item["type"] == "message":
            part = item["content"][0]
            out = [self._event("response.output_text.done", item_id=item["id"],
                               output_index=index, content_index=0, text=part["text"],
                               logprobs=[]),
                   self._event("response.content_part.done", item_id=item["id"],
                               output_index=index, content_index=0, part=part)]
        else:
            out = [self._event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=index, name=item["name"],
                               arguments=item["arguments"])]
        return out + [self._event("response.output_item.done", output_index=index, item=item)]

    # ---- the end -----------------------------------------------------------------------------
    async def finish(self) -> list[bytes]:
        """Every request ended: the last item closed, the response stored (``on_done``),
        then ``response.completed`` or ``response.incomplete``."""
        out = self._output("", True) if self.parser is not None else []  # held text, calls
        if not self.items:  # nothing said: an empty message, as the unstreamed output has
            out += self._open_message()
        out += self._close()
        status = status_of(self.finish_reason)
        response = response_object(self.meta, self.body, self.items, status, usage(self.finals))
        await self.on_done(response)
        return out + [self._event(f"response.{status}", response=dump(response))]

    def error(self, error: ApiError, broken: bool = False) -> list[bytes]:
        """An ``error`` event, then ``response.failed`` with the same code and message."""
        body = error.body()["error"]
        failed = self._response("failed", error={"code": body["code"] or "server_error",
                                                 "message": body["message"]})
        return [self._event("error", code=body["code"], message=body["message"],
                            param=body["param"]),
                self._event("response.failed", response=failed)]
