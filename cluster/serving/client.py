"""Python client handles onto a running shardlm engine service.

    from cluster import connect
    h = connect()                       # the engine named "shardlm" in the current Ray cluster
    print(h.generate("Hello", max_tokens=16).text)
    for piece in h.stream("Once upon a time", max_tokens=64):
        print(piece, end="", flush=True)

Many handles in many processes share one engine. Sampling parameters are the vLLM names
(``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ...), plus ``priority``.
Errors are the typed errors of :mod:`cluster.contract.errors` (a bad request raises
``RequestError`` naming the parameter). Leaving a stream early aborts its request on the
engine. A handle needs Ray, not torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import ray

from cluster.contract.errors import ServiceError
from cluster.serving.stream import RequestStream


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None

    @classmethod
    def of(cls, final: dict) -> "Completion":
        """The first choice of a ``final`` event."""
        first = final["outputs"][0]
        return cls(first["text"], first["token_ids"], first["finish_reason"],
                   final["prompt_tokens"], final["completion_tokens"], first["logprobs"])


def connect(name: str = "shardlm", namespace: str = "shardlm", address: str | None = "auto") -> "Handle":
    """Attach to the engine service ``name`` in ``namespace`` of the Ray cluster at ``address``."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise ServiceError(f"no shardlm engine named {name!r} in namespace {namespace!r}; "
                           "start one with `shardlm serve`") from exc
    return Handle(actor)


class Handle:
    def __init__(self, actor):
        self.actor = actor

    def request(self, prompt: str | None = None, messages: list[dict] | None = None,
                prompt_token_ids: list[int] | None = None, **sampling) -> RequestStream:
        """The event stream of one request (see :mod:`cluster.contract.events`); ``tools``
        (OpenAI's function definitions) go with ``messages``."""
        priority = sampling.pop("priority", 0)
        tools = sampling.pop("tools", None)
        return RequestStream(self.actor, prompt, messages, prompt_token_ids, sampling,
                             priority=priority, tools=tools)

    # ---- blocking --------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, **sampling) -> Completion:
        with self.request(prompt, **sampling) as stream:
            return Completion.of(stream.final())

    def chat(self, messages: list[dict], **sampling) -> Completion:
        with self.request(messages=messages, **sampling) as stream:
            return Completion.of(stream.final())

    def stream(self, prompt: str | None = None, **sampling) -> Iterator[str]:
        """Yield text deltas as the engine produces them (first choice)."""
        yield from _texts(self.request(prompt, **sampling))

    def chat_stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        yield from _texts(self.request(messages=messages, **sampling))

    # ---- asyncio ---------------------------------------------------------------------------
    async def agenerate(self, prompt: str | None = None, **sampling) -> Completion:
        with self.request(prompt, **sampling) as stream:
            return Completion.of(await stream.afinal())

    async def achat(self, messages: list[dict], **sampling) -> Completion:
        with self.request(messages=messages, **sampling) as stream:
            return Completion.of(await stream.afinal())

    async def astream(self, prompt: str | None = None, **sampling) -> AsyncIterator[str]:
        with self.request(prompt, **sampling) as stream:
            async for event in stream:
                if event["type"] == "delta" and event["text"]:
                    yield event["text"]

    # ---- the engine ------------------------------------------------------------------------
    def health(self) -> dict:
        return ray.get(self.actor.health.remote())

    def stats(self) -> dict:
        return ray.get(self.actor.stats.remote())


def _texts(stream: RequestStream) -> Iterator[str]:
    with stream:  # leaving early (break, an exception, the generator closed) aborts the request
        for event in stream:
            if event["type"] == "delta" and event["text"]:
                yield event["text"]
