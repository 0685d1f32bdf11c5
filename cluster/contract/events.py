"""The engine service's event stream: what one request's caller receives, as msgpack.

A request's stream is zero or more ``delta`` events, then exactly one ``final`` or
``error`` event:

- ``{"type": "delta", "index", "text", "token_ids", "finish_reason", "logprobs"}``
- ``{"type": "final", "request_id", "prompt_tokens", "completion_tokens", "cached_tokens",
  "outputs": [{"index", "text", "token_ids", "finish_reason", "stop_reason", "logprobs",
  "error"}]}``
- a choice's first delta and the final event also carry ``prompt_text`` (the request asked
  for ``echo``) and ``prompt_logprobs`` (its ``prompt_logprobs`` parameter: one entry per
  prompt token, the first without a logprob)
- ``{"type": "error", "error": "request" | "request_type" | "unavailable" | "internal", "kind",
  "message", "param"}``: the typed errors of :mod:`cluster.contract.errors`, turned into an event by
  :func:`error_event` and back into the exception by :func:`raise_if_error`.

Every event carries ``"v": EVENT_VERSION``, so a caller of another shardlm version fails
loudly instead of misreading a stream.
"""

from __future__ import annotations

import msgpack

from cluster.contract.errors import (INVALID_VALUE, UNKNOWN_PARAMETER, EngineUnavailable,
                                     RequestError, RequestTypeError, ServiceError)

EVENT_VERSION = 2


def encode(event: dict) -> bytes:
    return msgpack.packb({**event, "v": EVENT_VERSION})


def decode(data: bytes) -> dict:
    try:
        event = msgpack.unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ServiceError(f"cannot decode an engine event: {exc}") from exc
    if not isinstance(event, dict) or event.get("v") != EVENT_VERSION:
        got = event.get("v") if isinstance(event, dict) else type(event).__name__
        raise ServiceError(f"engine event version {got!r}, this process speaks {EVENT_VERSION}: "
                           "caller and engine must run the same shardlm")
    return event


def error_event(exc: BaseException) -> dict:
    """The ``error`` event of an exception: typed errors keep their class, kind and param;
    anything else is an internal error."""
    if isinstance(exc, RequestError):
        error = "request_type" if isinstance(exc, RequestTypeError) else "request"
        return {"type": "error", "error": error, "kind": exc.kind, "message": exc.message,
                "param": exc.param}
    error = "unavailable" if isinstance(exc, EngineUnavailable) else "internal"
    return {"type": "error", "error": error, "kind": None, "message": str(exc), "param": None}


def raise_if_error(event: dict) -> dict:
    """``event`` itself, or, for an ``error`` event, its typed exception raised."""
    if event["type"] != "error":
        return event
    error, message = event.get("error"), str(event.get("message") or "the request failed")
    if error == "request":
        raise RequestError(message, event.get("param"), event.get("kind"))
    if error == "request_type":
        raise RequestTypeError(message, event.get("param"), event.get("kind"))
    if error == "unavailable":
        raise EngineUnavailable(message)
    raise ServiceError(message)


# ---- the request a front door sends (the service's generate() argument) -------------------
REQUEST_FIELDS = ("request_id", "prompt", "messages", "prompt_token_ids", "params", "priority",
                  "resume", "final_logprobs", "echo", "tools", "incarnation")


def encode_request(**fields) -> bytes:
    """A request to the engine service: exactly one of ``prompt``, ``messages`` and
    ``prompt_token_ids``, ``params`` (sampling parameters by name), ``request_id`` and
    ``priority``; ``resume`` (sent by :class:`cluster.serving.stream.RequestStream` only): per
    choice, the tokens its caller already has from an engine that was lost; with it,
    ``incarnation``: the engine incarnation (``EngineService.incarnation``) the request was
    last sent to, so that this engine, if it is that one and still holds the request, lets
    the resumed request replace its copy (the caller's stream broke, not the engine);
    ``final_logprobs: false``: a caller that reads the deltas (which carry every token's
    logprobs) needs none in the final event, so the engine keeps none (memory bounded by a
    step, not by the output); ``echo: true``: each choice's first delta and the final event
    carry ``prompt_text``; ``tools``: the functions a chat request's model may call (OpenAI's
    definitions), rendered with its messages. The engine checks the values at admission."""
    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown request field(s): {', '.join(unknown)}", unknown[0],
                           UNKNOWN_PARAMETER)
    body = {"v": EVENT_VERSION, **{k: fields.get(k) for k in REQUEST_FIELDS}}
    try:
        return msgpack.packb(body)
    except UnicodeEncodeError as exc:  # e.g. a lone surrogate ("\ud800") in JSON text
        field = _unencodable(body)
        raise RequestError(f"{field} holds text that is not valid Unicode "
                           f"({exc.reason}: {exc.object[exc.start:exc.end]!r})",
                           field, INVALID_VALUE) from None
    except OverflowError:  # an integer past 64 bits (in a schema, a tool's parameters)
        field = _unencodable(body)
        raise RequestError(f"{field} holds an integer outside the 64-bit range", field,
                           INVALID_VALUE) from None


def _unencodable(body: dict) -> str:
    """The request field (or sampling parameter) whose text cannot be encoded as UTF-8."""
    for name, value in body.items():
        parts = value.items() if name == "params" and isinstance(value, dict) else [(name, value)]
        for part, item in parts:
            try:
                msgpack.packb(item)
            except (UnicodeEncodeError, OverflowError):
                return part
    return "request"


def decode_request(data: bytes) -> dict:
    request = decode(data)
    return {k: request.get(k) for k in REQUEST_FIELDS}
