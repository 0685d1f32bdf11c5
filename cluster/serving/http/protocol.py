"""OpenAI-compatible request and response models for :mod:`cluster.serving.http.app`.

Requests are strict: a field of the wrong JSON type is an error (``"5"`` is not
an integer, ``true`` is not a number), an unknown field is an error that names
it, and every number has the range the engine can serve. OpenAI fields that
shardlm does not implement are refused by name (``suffix`` is accepted as null, ``best_of``
equal to ``n``). The sampling extensions ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``allowed_token_ids``, ``bad_words``,
``stop_token_ids`` and ``ignore_eos`` are the vLLM names.

Responses are the shapes the OpenAI API returns, so the ``openai`` client parses them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from cluster.contract.sampling import MAX_STOP_LENGTH

MAX_CHOICES = 64  # prompts x n in one request
MAX_STOP = 16  # stop strings in one request
MAX_LOGPROBS = 20  # top logprobs per token
_I32 = (1 << 31) - 1

STRICT = ConfigDict(extra="forbid", strict=True)  # requests: exact JSON types, no unknown fields


def _integral(v: Any) -> Any:
    """JSON Schema's integers include 2.0: take it as 2 (strings and booleans stay errors)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(lo: int, hi: int) -> Any:
    """An integer in [lo, hi] (the bounds before the validator, so the schema shows them)."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


Int = Annotated[int, BeforeValidator(_integral)]
TokenId = _int(0, _I32)
MaxTokens = _int(1, _I32)
Seed = _int(-(1 << 63), (1 << 64) - 1)
TopN = _int(0, MAX_LOGPROBS)
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


def _real(default, **bounds) -> Any:
    return Field(default, allow_inf_nan=False, **bounds)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (always enforced strictly)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON schema; none: any "
                                 "JSON object")
    strict: bool | None = Field(None, description="accepted: the schema is always enforced")


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type json_schema, and only with it")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: dict | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: str | None = Field(None, description="EBNF (GBNF dialect), rule root")
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def engine_params(self) -> dict:
        d = self.model_dump(by_alias=True, exclude_none=True)
        return {k: v for k, v in d.items() if v is not False or k == "disable_any_whitespace"}


class _Sampling(BaseModel):
    """Fields the completions and chat endpoints share."""

    model_config = STRICT
    model: str = Field(description="the served model's id (see /v1/models)")
    n: _int(1, MAX_CHOICES) = Field(1, description="completions per prompt")
    temperature: float | None = _real(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = _real(None, gt=0.0, le=1.0)
    top_k: _int(-1, _I32) | None = Field(None, description="extension; -1 or 0: off")
    min_p: float | None = _real(None, ge=0.0, le=1.0, description="extension")
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = Field(
        None, description="extension")
    ignore_eos: bool = Field(False, description="extension")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    frequency_penalty: float | None = _real(None, ge=-2.0, le=2.0,
                                            description="minus this times a token's count in "
                                            "the output")
    presence_penalty: float | None = _real(None, ge=-2.0, le=2.0,
                                           description="minus this once for a token in the output")
    repetition_penalty: float | None = _real(None, gt=0.0, le=100.0,
                                             description="vLLM's extension: divides the positive "
                                             "(multiplies the negative) logits of tokens in the "
                                             "prompt or output; 1: off")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, description="token id (as a string) -> added to its logit, in [-100, 100]")
    min_tokens: _int(0, _I32) = Field(0, description="extension: no stop before this many tokens")
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = Field(
        None, description="extension: only these tokens may be sampled")
    bad_words: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
                         Field(max_length=MAX_STOP)] | None = Field(
        None, description="extension: words not to generate")

    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output follows it")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's extension: json, regex, choice, grammar or json_object")
    guided_json: dict | str | None = Field(None, description="vLLM's older name of "
                                           "structured_outputs.json")
    guided_regex: str | None = Field(None, description="older name of structured_outputs.regex")
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="older name of structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="older name of "
                                       "structured_outputs.grammar")
    guided_decoding_backend: str | None = Field(None, description="accepted and ignored: the "
                                                "grammar library is xgrammar")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _one_constraint(self):
        given = self.constraint_sources()
        if len(given) > 1:
            raise ValueError(f"give one output constraint, not several: {', '.join(given)}")
        return self

    def constraint_sources(self) -> list[str]:
        given = [name for name in ("structured_outputs", "guided_json", "guided_regex",
                                   "guided_choice", "guided_grammar") if getattr(self, name)]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    def structured(self) -> dict | None:
        """The engine's ``structured_outputs`` from whichever field gave a constraint (a
        schema as its JSON text: any JSON number travels)."""
        out = self._structured()
        if out is not None and isinstance(out.get("json"), dict):
            out["json"] = json.dumps(out["json"])
        return out

    def _structured(self) -> dict | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.engine_params()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return {"json_object": True}
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            return {"json": schema} if schema is not None else {"json_object": True}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                return {key: getattr(self, name)}
        return None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """The engine's SamplingParams fields (see cluster.contract.sampling)."""
        params = {"n": self.n, "max_tokens": max_tokens, "ignore_eos": self.ignore_eos,
                  "logprobs": logprobs, "seed": self.seed, "stop": self.stop,
                  "stop_token_ids": self.stop_token_ids, "logit_bias": self.logit_bias,
                  "min_tokens": self.min_tokens, "allowed_token_ids": self.allowed_token_ids,
                  "bad_words": self.bad_words, "structured_outputs": self.structured()}
        for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                     "presence_penalty", "repetition_penalty"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return params


PromptText = Annotated[str, Field(min_length=1)]
PromptList = Annotated[list[PromptText], Field(min_length=1, max_length=MAX_CHOICES)]
TokenList = Annotated[list[TokenId], Field(min_length=1)]
TokenLists = Annotated[list[TokenList], Field(min_length=1, max_length=MAX_CHOICES)]


class CompletionRequest(_Sampling):
    prompt: PromptText | PromptList | TokenList | TokenLists = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists; "
                    "each prompt gets n choices")
    max_tokens: MaxTokens | None = Field(16, description="default 16")
    logprobs: TopN | None = Field(None, description="logprobs of the sampled token and the top N")
    echo: bool = Field(False, description="each choice's text (and logprobs) begins with "
                       "the prompt's")
    suffix: str | None = Field(None, description="not supported: null only",
                               json_schema_extra={"anyOf": [{"type": "null"}]})
    best_of: _int(1, MAX_CHOICES) | None = Field(None, description="must equal n")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported unless it equals n")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """One (text, token ids) pair per prompt, exactly one of them set."""
        p = self.prompt
        if isinstance(p, str):
            return [(p, None)]
        if all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        if all(isinstance(x, int) for x in p):
            return [(None, list(p))]
        return [(None, list(x)) for x in p]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = STRICT
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


Content = str | Annotated[list[TextPart], Field(min_length=1)]


class _Message(BaseModel):
    model_config = STRICT
    name: str | None = Field(None, description="accepted and ignored")

    def as_template_message(self) -> dict:
        content = getattr(self, "content", None)
        text = content if isinstance(content, str) or content is None else "".join(
            part.text for part in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if getattr(self, "tool_calls", None):
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if getattr(self, "tool_call_id", None):
            out["tool_call_id"] = self.tool_call_id
        return out


class PlainMessage(_Message):
    role: Literal["system", "developer", "user"]
    content: Content


class AssistantMessage(_Message):
    """An earlier answer: its content, its tool calls, or both."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = Field(
        None, description="the calls it made")

    @model_validator(mode="after")
    def _something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    """A tool's answer to one call."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(description="the call it answers")


ChatMessage = Annotated[PlainMessage | AssistantMessage | ToolMessage,
                        Field(discriminator="role")]


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="accepted: required and named calls are "
                                "always held to the schema")


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = Field(None, description="deprecated name of "
                                            "max_completion_tokens")
    max_completion_tokens: MaxTokens | None = Field(
        None, description="default: up to the model's context length")
    logprobs: bool = False
    top_logprobs: TopN | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="false: at most one call")

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        mode = self.tool_mode
        if mode not in ("none", "auto") and not self.tools:
            raise ValueError(f"tool_choice {mode} needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in [
                t.function.name for t in self.tools or []]:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is "
                             "not among the tools")
        if mode in ("required", "named") and self.constraint_sources():
            raise ValueError(f"tool_choice {mode} constrains the output itself: drop "
                             + ", ".join(self.constraint_sources()))
        return self

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        return choice or ("auto" if self.tools else "none")

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        """None: as many as the context leaves after the prompt (the engine works it out)."""
        return self.max_completion_tokens or self.max_tokens


# ---- responses -----------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """With ``echo``, the prompt's first token has no logprob (null) and no top logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    """Also each event of a stream (``finish_reason`` null until the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shardlm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["starting", "ready", "recovering", "failed", "unavailable"]
    reason: str | None = None
    # failed: seconds until the engine service tries again (a new engine), when it said so
    retry_in_s: float | None = None
