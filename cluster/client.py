"""Python client handles onto a running shardlm engine service.

    from cluster import connect
    h = connect()                       # the engine named "shardlm" in the current Ray cluster
    print(h.generate("Hello", max_tokens=16).text)
    for piece in h.stream("Once upon a time", max_tokens=64):
        print(piece, end="", flush=True)

Many handles in many processes share one engine. Sampling parameters are the
vLLM names (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import msgpack
import ray

from cluster.engine import RequestError


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None


class ServiceError(RuntimeError):
    """The engine could not serve the request (not ready, failed, internal error)."""


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

    def _call(self, prompt=None, messages=None, prompt_token_ids=None, **sampling):
        body = {"prompt": prompt, "messages": messages, "prompt_token_ids": prompt_token_ids,
                "params": sampling, "priority": sampling.pop("priority", 0)}
        return self.actor.generate.options(num_returns="streaming").remote(msgpack.packb(body))

    # ---- blocking --------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, **sampling) -> Iterator[str]:
        """Yield text deltas as the engine produces them (first choice)."""
        for event in self._events(self._call(prompt, **sampling)):
            if event["type"] == "delta" and event["text"]:
                yield event["text"]

    def generate(self, prompt: str | None = None, **sampling) -> Completion:
        return _completion(self._events(self._call(prompt, **sampling)))

    def chat(self, messages: list[dict], **sampling) -> Completion:
        return _completion(self._events(self._call(messages=messages, **sampling)))

    def chat_stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        for event in self._events(self._call(messages=messages, **sampling)):
            if event["type"] == "delta" and event["text"]:
                yield event["text"]

    def _events(self, gen) -> Iterator[dict]:
        done = False
        try:
            for ref in gen:
                event = _check(msgpack.unpackb(ray.get(ref)))
                done = event["type"] == "final"
                yield event
        finally:
            if not done:  # the caller stopped early: abort the request on the engine
                ray.cancel(gen)

    # ---- asyncio ---------------------------------------------------------------------------
    async def astream(self, prompt: str | None = None, **sampling) -> AsyncIterator[str]:
        async for event in self._aevents(self._call(prompt, **sampling)):
            if event["type"] == "delta" and event["text"]:
                yield event["text"]

    async def agenerate(self, prompt: str | None = None, **sampling) -> Completion:
        return _completion([e async for e in self._aevents(self._call(prompt, **sampling))])

    async def achat(self, messages: list[dict], **sampling) -> Completion:
        return _completion([e async for e in self._aevents(self._call(messages=messages, **sampling))])

    async def _aevents(self, gen) -> AsyncIterator[dict]:
        done = False
        try:
            async for ref in gen:
                event = _check(msgpack.unpackb(await ref))
                done = event["type"] == "final"
                yield event
        finally:
            if not done:
                ray.cancel(gen)

    def health(self) -> dict:
        return ray.get(self.actor.health.remote())

    def stats(self) -> dict:
        return ray.get(self.actor.stats.remote())


def _check(event: dict) -> dict:
    if event["type"] == "error":
        if event["kind"] == "bad_request":
            raise RequestError(event["message"])
        raise ServiceError(event["message"])
    return event


def _completion(events) -> Completion:
    final = None
    for event in events:
        if event["type"] == "final":
            final = event
    if final is None:
        raise ServiceError("the engine closed the stream without a final result")
    first = final["outputs"][0]
    return Completion(first["text"], first["token_ids"], first["finish_reason"],
                      final["prompt_tokens"], final["completion_tokens"], first["logprobs"])
