"""Tool calls in chat completions: the constraint a ``tool_choice`` puts on the output, and
the output read back as ``tool_calls``, whole or as stream deltas.

The modes (:attr:`cluster.serving.http.protocol.ChatCompletionRequest.tool_mode`):

- ``none``: the tools are not shown to the model and the output is content;
- ``auto``: the model sees the tools and may call some: a call is a ``<tool_call>`` element
  holding ``{"name": ..., "arguments": {...}}`` (the Hermes convention; templates that know
  tools have their own words for it, and the engine teaches it to those that do not, see
  ``cluster.engine.chat``); text before the first call is the content;
- ``required``: the output is held by the grammar to a JSON array of one or more
  ``{"name", "arguments"}`` objects, each matching one tool's parameters (one at most with
  ``parallel_tool_calls: false``);
- ``named``: the output is held to the named function's parameters: it is the arguments.

An output that does not parse as calls stays content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
import uuid

from cluster.serving.http.protocol import (ChatCompletionRequest, ToolCall, ToolCallDelta,
                                           ToolCallFunction, ToolCallFunctionDelta)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)
ANY_OBJECT = {"type": "object"}


def engine_fields(body: ChatCompletionRequest) -> tuple[list[dict] | None, dict | None]:
    """The tools the engine renders with the messages (None: none shown) and the output
    constraint of the tool choice (None: the request's own, if any)."""
    mode = body.tool_mode
    if mode == "none" or not body.tools:
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if mode == "named":
        name = body.tool_choice.function.name
        fn = next(t.function for t in body.tools if t.function.name == name)
        return tools, {"json": json.dumps(fn.parameters or ANY_OBJECT)}
    if mode == "required":
        items = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "arguments"],
                  "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                 "arguments": t.function.parameters or ANY_OBJECT}}
                 for t in body.tools]
        schema = {"type": "array", "minItems": 1,
                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return tools, {"json": json.dumps(schema)}
    return tools, None


def _call(name: str, arguments) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(
        name=name, arguments=text))


def _calls_of(items: list) -> list[ToolCall] | None:
    """``{"name", "arguments"}`` objects as calls; None when any is not one."""
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return None
        calls.append(_call(item["name"], item.get("arguments", item.get("parameters", {}))))
    return calls


def parse(mode: str, text: str, name: str | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output."""
    if mode == "named":
        return None, [_call(name, text.strip())]
    if mode == "required":
        try:
            calls = _calls_of(json.loads(text))
        except (ValueError, TypeError):
            calls = None
        return (text, []) if not calls else (None, calls)
    if mode == "auto" and OPEN in text:
        items = []
        for body in _CALL.findall(text):
            try:
                items.append(json.loads(body))
            except ValueError:
                return text, []
        calls = _calls_of(items)
        if calls:
            content = text[:text.index(OPEN)]
            return content if content.strip() else None, calls
    return text, []


def finish_reason(reason: str | None, mode: str, called: bool) -> str | None:
    """OpenAI's: ``tool_calls`` when the model chose to call (auto, required)."""
    return "tool_calls" if called and reason == "stop" and mode in ("auto", "required") else reason


class StreamParser:
    """One choice's streamed output as chat deltas: content as it comes (in auto, minus what
    may be the start of a call), the named function's arguments as they come, other calls
    once the output is whole."""

    def __init__(self, mode: str, name: str | None = None):
        self.mode, self.name = mode, name
        self.held = ""  # text not sent yet
        self.calling = False  # auto: a call has begun; required: always
        self.opened = False  # named: the call's first delta went out

    def feed(self, text: str) -> tuple[str | None, list[ToolCallDelta]]:
        """(content, tool-call deltas) to send for a new piece of text."""
        if self.mode == "named":
            first = not self.opened
            self.opened = True
            if not text and not first:
                return None, []
            return None, [ToolCallDelta(
                index=0, id=f"call_{uuid.uuid4().hex[:24]}" if first else None,
                type="function" if first else None,
                function=ToolCallFunctionDelta(name=self.name if first else None, arguments=text))]
        self.held += text
        if self.mode != "auto" or self.calling:
            return None, []
        if OPEN in self.held:
            cut = self.held.index(OPEN)
            content, self.held, self.calling = self.held[:cut], self.held[cut:], True
            return content or None, []
        keep = _partial_open(self.held)  # a tail that may begin a call waits
        content, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return content or None, []

    def finish(self) -> tuple[str | None, list[ToolCallDelta]]:
        """What is left once the output is whole: its calls, or the held text as content."""
        if self.mode == "named" or not self.held:
            return None, []
        content, calls = parse(self.mode, self.held)
        self.held = ""
        deltas = [ToolCallDelta(index=i, id=c.id, type="function", function=ToolCallFunctionDelta(
            name=c.function.name, arguments=c.function.arguments)) for i, c in enumerate(calls)]
        return content, deltas


def _partial_open(text: str) -> int:
    """The length of the longest tail of ``text`` that begins ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
