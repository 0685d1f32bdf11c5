"""Typed errors shared by the engine and every front door (offline ``LLM``, client handles,
the HTTP API, batch jobs).

An error carries what a caller needs to act on it: a :class:`RequestError` names the
input at fault (``param``) and what is wrong with it (``kind``); the HTTP layer maps the
class and kind to a status and an OpenAI error code without reading the message. They
travel between processes as ``error`` events (:mod:`cluster.contract.events`).
"""

from __future__ import annotations

# what a RequestError can say is wrong (the HTTP API's error ``code``)
INVALID_VALUE = "invalid_value"  # a value out of range or malformed
INVALID_TYPE = "invalid_type"  # a value of the wrong type
UNKNOWN_PARAMETER = "unknown_parameter"  # a name the API does not know
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the prompt leaves no room to generate
DUPLICATE_REQUEST_ID = "duplicate_request_id"


class RequestError(ValueError):
    """A request that cannot be served as given. The engine rejects it at admission and
    goes on serving the others."""

    default_kind = INVALID_VALUE

    def __init__(self, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.kind = kind or self.default_kind

    def prefixed(self, prefix: str) -> "RequestError":
        """The same error with ``prefix`` before its message (e.g. which prompt of a batch)."""
        return type(self)(f"{prefix}{self.message}", self.param, self.kind)


class RequestTypeError(RequestError, TypeError):
    """A request value of the wrong type (also a ``TypeError``, as Python callers expect)."""

    default_kind = INVALID_TYPE


class EngineUnavailable(RuntimeError):
    """The engine cannot take or finish requests now: it is starting, recovering with its
    queue full, or it gave up recovering. Worth retrying later (HTTP 503)."""


class ServiceError(RuntimeError):
    """The engine failed on a request for a reason of its own (HTTP 500), or its event
    stream broke off."""


def lone_surrogate(text: str) -> str | None:
    """Where ``text`` is not Unicode with a UTF-8 form, what is wrong with it ("a lone
    surrogate U+D800 at character 3": JSON's \\u escapes can carry one, and a tokenizer or a
    UTF-8 file cannot take it); None where it is fine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return None
