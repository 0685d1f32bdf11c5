"""One request to the engine service, as the HTTP front sees it: its event stream, with
engine failures turned into API errors, and cancellation that frees its KV blocks."""

from __future__ import annotations

import msgpack
import ray

from cluster.openai_format import ApiError


class ServiceCall:
    """The event stream of one request to the engine service."""

    def __init__(self, service, request: dict, param: str):
        self.service, self.request_id, self.param = service, request["request_id"], param
        self.stream = service.generate.options(num_returns="streaming").remote(msgpack.packb(request))
        self.done = False

    async def next(self) -> dict:
        try:
            event = msgpack.unpackb(await (await self.stream.__anext__()))
        except StopAsyncIteration:
            self.done = True
            raise ApiError(500, "the engine ended the request without a result", code="internal_error")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self.done = True
            raise ApiError(503, f"the engine service is unavailable: {exc}", code="engine_unavailable")
        except ray.exceptions.RayError as exc:
            self.done = True
            raise ApiError(500, f"the engine failed: {exc}", code="internal_error")
        self.done = event["type"] != "delta"
        if event["type"] == "error":
            raise ApiError.from_event(event, self.param)
        return event

    def cancel(self) -> None:
        """Abort the request if it is still running (frees its KV blocks)."""
        if not self.done:
            self.done = True
            ray.cancel(self.stream)
            self.service.abort.remote(self.request_id)


async def until_final(call: ServiceCall) -> dict:
    while (event := await call.next())["type"] != "final":
        pass
    return event
