"""The Responses API's request and response models (``POST /v1/responses``), as strict as
:mod:`cluster.serving.http.protocol`'s: exact JSON types, unknown fields refused by name.

The request fields fall in three groups (README, "The Responses API"):

- honoured: ``model``, ``input`` (a string, or items: ``message``, ``function_call``,
  ``function_call_output``), ``instructions``, ``max_output_tokens``, ``temperature``,
  ``top_p``, ``tools`` (function tools), ``tool_choice``, ``parallel_tool_calls``,
  ``text.format``, ``metadata``, ``store``, ``stream``, ``previous_response_id``;
- hints, accepted and echoed where OpenAI echoes them, changing nothing: ``user``,
  ``safety_identifier``, ``prompt_cache_key``, ``prompt_cache_retention``, ``reasoning``
  (the model does not reason: no reasoning items), ``text.verbosity``, ``service_tier``,
  ``max_tool_calls`` (it counts built-in tools; there are none), ``stream_options``,
  ``include`` (its values name output this server never makes), ``truncation: disabled``,
  ``background: false``, ``top_logprobs: 0``, an item's ``id``, ``status`` and ``phase``;
- refused with a 400 naming them: ``background: true``, ``conversation``, ``prompt``,
  ``truncation: auto``, ``top_logprobs`` above 0 and ``include`` of
  ``message.output_text.logprobs`` (no logprobs here), tools other than functions, tool
  choices other than none/auto/required/a function, content other than text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.serving.http.protocol import STRICT, MaxTokens, _int, _real
from cluster.serving.http.responses_items import InputItem, ItemStatus, check_input

LOGPROBS_INCLUDE = "message.output_text.logprobs"
MAX_METADATA = 16


# ---- tools and formats -------------------------------------------------------------------
class FunctionTool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="accepted: required and named calls are "
                                "always held to the schema")


class FunctionChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its ``name`` and
    ``schema`` (always enforced)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = Field(None, description="accepted: the schema is always enforced")

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        named = self.name is not None or self.schema_ is not None
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs its name and schema")
        if self.type != "json_schema" and (named or self.description or self.strict is not None):
            raise ValueError(f"name, schema, description and strict go with type json_schema, "
                             f"not {self.type}")
        return self


class TextConfig(BaseModel):
    model_config = STRICT
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="accepted "
                                                                "and ignored")


class Reasoning(BaseModel):
    """Accepted and ignored: the model does not reason (no reasoning items, no reasoning
    tokens)."""

    model_config = STRICT
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponseStreamOptions(BaseModel):
    model_config = STRICT
    include_obfuscation: bool | None = Field(None, description="accepted and ignored")


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)],
                          Annotated[str, Field(max_length=512)]], Field(max_length=MAX_METADATA)]


class ResponsesRequest(BaseModel):
    model_config = STRICT
    model: str = Field(description="the served model's id (see /v1/models)")
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="a user message's text, or items: messages, function calls and their "
                    "outputs")
    instructions: str | None = Field(None, description="a system message first (not carried "
                                     "to a continuation)")
    previous_response_id: str | None = Field(None, description="a stored response to continue: "
                                             "its conversation comes before the input")
    max_output_tokens: MaxTokens | None = Field(None, description="default: up to the model's "
                                                "context length")
    temperature: float | None = _real(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = _real(None, gt=0.0, le=1.0)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")
    text: TextConfig | None = None
    metadata: Metadata | None = None
    store: bool | None = Field(None, description="default true: kept for GET and "
                               "previous_response_id (a bounded store)")
    stream: bool | None = False
    # hints (see the module docstring)
    user: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    prompt_cache_key: str | None = Field(None, description="accepted and ignored: prefixes are "
                                         "cached by themselves")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        None, description="accepted and ignored")
    reasoning: Reasoning | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(
        None, description="accepted and ignored")
    max_tool_calls: _int(1, (1 << 31) - 1) | None = Field(
        None, description="accepted and ignored: it counts built-in tools, and there are none")
    stream_options: ResponseStreamOptions | None = None
    include: list[str] | None = Field(None, description="accepted and ignored, but for "
                                      f"{LOGPROBS_INCLUDE} (not supported)")
    # refused unless at their default
    truncation: Literal["disabled", "auto"] | None = Field(None, description="disabled only")
    background: bool | None = Field(None, description="false only")
    top_logprobs: _int(0, 20) | None = Field(None, description="0 only: no logprobs")
    conversation: Any = Field(None, description="not supported: null only",
                              json_schema_extra={"anyOf": [{"type": "null"}]})
    prompt: Any = Field(None, description="not supported: null only",
                        json_schema_extra={"anyOf": [{"type": "null"}]})

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        return check_input(value)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"tools[{i}].type: {tool.get('type')!r} is not supported: this "
                                 "server runs function tools only")
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice(cls, choice: Any) -> Any:
        if isinstance(choice, dict) and choice.get("type") != "function":
            raise ValueError(f"{choice.get('type')!r} is not supported: none, auto, required "
                             "or a function ({\"type\": \"function\", \"name\": ...})")
        return choice

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        mode = "named" if isinstance(choice, FunctionChoice) else choice
        if mode in ("required", "named") and not tools:
            raise ValueError(f"tool_choice {mode} needs tools")
        if mode == "named" and choice.name not in [t.name for t in tools]:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        return choice

    @field_validator("text")
    @classmethod
    def _format_or_calls(cls, text: TextConfig, info: ValidationInfo) -> TextConfig:
        choice = info.data.get("tool_choice")
        if (isinstance(choice, FunctionChoice) or choice == "required") and text.format \
                and text.format.type != "text":
            raise ValueError("tool_choice required or named constrains the output itself: "
                             "drop text.format")
        return text

    @field_validator("background", "conversation", "prompt", "truncation", "top_logprobs",
                     "include")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if name == "include":
            refused = LOGPROBS_INCLUDE in (value or [])
        elif name in ("conversation", "prompt"):
            refused = value is not None
        else:
            refused = value == {"background": True, "truncation": "auto"}.get(name) or (
                name == "top_logprobs" and bool(value))
        if refused:
            shown = LOGPROBS_INCLUDE if info.field_name == "include" else json.dumps(value)
            raise ValueError(f"{info.field_name} {shown} is not supported by this server "
                             "(README, \"The Responses API\")")
        return value

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named (see :mod:`cluster.serving.http.tools`)."""
        if isinstance(self.tool_choice, FunctionChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def format_type(self) -> str | None:
        return self.text.format.type if self.text and self.text.format else None


# ---- responses ---------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None = None
    output: list[OutputItem]
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionTool]
    text: dict = Field(description="the request's text config (format default text)")
    reasoning: Reasoning | None = None
    truncation: Literal["disabled"] = "disabled"
    store: bool
    background: bool = False
    service_tier: str = "default"
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None


class ResponseStreamEvent(BaseModel):
    """One server-sent event of a streamed response (``event:`` is its ``type``): the
    lifecycle events carry ``response``; item events ``output_index`` and ``item``; content
    events ``item_id``, ``content_index`` and ``part``, ``delta``, ``text`` or ``arguments``;
    ``error`` its ``code``, ``message`` and ``param``."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int
    response: Response | None = None
    output_index: int | None = None
    item: OutputItem | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
