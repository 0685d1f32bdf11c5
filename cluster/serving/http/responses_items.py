"""The Responses API's input items (``input`` as a list): ``message`` (roles user, system,
developer, assistant; text content), ``function_call`` (a call the model made) and
``function_call_output`` (its result), each checked where it stands so that an error names
its place (``input[2].type``). Part of :mod:`cluster.serving.http.responses_protocol`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationError

from cluster.serving.http.protocol import STRICT

ITEM_TYPES = ("message", "function_call", "function_call_output")
TEXT_PARTS = ("input_text", "output_text", "refusal")


class ItemText(BaseModel):
    """A message's text: ``input_text`` (user, system, developer) or ``output_text`` (an
    earlier answer, as the API returned it)."""

    model_config = STRICT
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = Field(None, description="accepted and ignored")
    logprobs: list | None = Field(None, description="accepted and ignored")


class ItemRefusal(BaseModel):
    model_config = STRICT
    type: Literal["refusal"]
    refusal: str


Part = Annotated[ItemText | ItemRefusal, Field(discriminator="type")]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(BaseModel):
    model_config = STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Part]
    id: str | None = Field(None, description="accepted and ignored")
    status: ItemStatus | None = Field(None, description="accepted and ignored")
    phase: Literal["commentary", "final_answer"] | None = Field(None, description="accepted "
                                                                "and ignored")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, ItemText) else p.refusal for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made (an earlier output, sent back with its result)."""

    model_config = STRICT
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str = Field(description="the arguments as JSON text")
    id: str | None = Field(None, description="accepted and ignored")
    status: ItemStatus | None = Field(None, description="accepted and ignored")


class CallOutputText(BaseModel):
    model_config = STRICT
    type: Literal["input_text"]
    text: str


class FunctionCallOutputItem(BaseModel):
    """A function's result, answering the call of ``call_id``."""

    model_config = STRICT
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[CallOutputText]
    id: str | None = Field(None, description="accepted and ignored")
    status: ItemStatus | None = Field(None, description="accepted and ignored")

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(
            p.text for p in self.output)


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type)]
_ITEM = TypeAdapter(InputItem)


def check_input(value: Any) -> Any:
    """The items, each read on its own so that an error names its place (``input[2].type``,
    ``input[0].content[1].type``, ``input[3].call_id``); types this server does not take and
    content other than text are refused by name."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("a string (the user's message) or a list of items")
    if not value:
        raise ValueError("at least one item")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"input[{i}]: an item is an object")
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            raise ValueError(f"input[{i}].type: {kind!r} is not an item this server takes "
                             f"({', '.join(ITEM_TYPES)})")
        content = item.get("content") if kind == "message" else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") not in TEXT_PARTS:
                raise ValueError(f"input[{i}].content[{j}].type: {part.get('type')!r} is not "
                                 f"supported: the model reads text ({', '.join(TEXT_PARTS)})")
        try:
            _ITEM.validate_python(item)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in error["loc"][1:])
            raise ValueError(f"input[{i}]{where}: {error['msg']}") from None
    return value
