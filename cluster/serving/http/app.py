"""The OpenAI-compatible HTTP API: a Ray Serve application with a FastAPI ingress.

Each replica is a thin HTTP front: it validates requests (:mod:`cluster.serving.http.protocol`),
forwards them to the engine service (the detached actor of :mod:`cluster.serving.service`,
created on first use) and turns its events into OpenAI responses
(:mod:`cluster.serving.http.format`). Routes: ``POST /v1/completions``, ``POST
/v1/chat/completions`` (both with ``stream: true`` as server-sent events), ``GET
/v1/models``, ``GET /v1/models/{model}``, vLLM's ``POST /tokenize`` and ``POST /detokenize``
(:mod:`cluster.serving.http.tokenize`), the Responses API's ``POST /v1/responses`` and
``GET``/``DELETE /v1/responses/{id}`` (:mod:`cluster.serving.http.responses`), ``GET
/health``, ``GET /metrics``, and FastAPI's ``/openapi.json`` and ``/docs``.

- API keys (``api_key``/``api_keys`` or ``$SHARDLM_API_KEY``, comma-separated) guard
  ``/v1/*`` with ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open
  for probes and scrapers. Without keys the API is open, and the replica logs so.
- Bodies over ``max_body_bytes`` (default 4 MiB: a full 128K-token context as text or as
  token ids, with room to spare) get 413 before any route reads them.
- Errors have OpenAI's shape ``{"error": {message, type, param, code}}``: 400 bad input,
  401 key, 404 model, 413 body, 503 (with ``Retry-After``) while the engine starts or failed,
  500 for the server's own faults. A 5xx (or an error event inside a stream that is not the
  client's fault) says a fixed public sentence and a request id (in the message and in
  ``X-Request-Id``: the completion's id where there is one); its detail (exception text, Ray
  traceback, which worker or node) is logged under that id, never sent
  (:func:`cluster.serving.http.format.api_error`).
- A client that disconnects before its answer is complete (streaming or not) aborts its
  requests; their KV blocks are freed.
- A streaming client must keep reading: each of its requests' events wait for it in a backlog
  bounded by ``deployment.stream_buffer_bytes`` (:mod:`cluster.serving.mux`), and a
  chunk its connection does not take within ``deployment.stream_stall_timeout_s`` ends the
  response (:class:`cluster.serving.http.format.EventStream`). Either way its requests are
  aborted and the log names them; the other streams go on.

KubeRay's ``serveConfigV2`` names ``cluster.serving.http.deploy:app_builder`` (requests come
through Serve's proxy); ``shardlm serve`` calls :func:`cluster.serving.http.deploy.deploy`, by
default with direct ingress: each replica listens on the port itself
(:mod:`cluster.serving.http.listener`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass

import ray
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException

from cluster.contract.config import EngineConfig
from cluster.serving.http.format import (REQUEST_ID_HEADER, RETRY_AFTER_S, ApiError, ChatStream,
                                         CompletionStream, EventStream, ResponseInfo, ToolMode,
                                         api_error, chat_response, completion_response,
                                         internal_error, validation_error)
from cluster.serving.http.gate import KeyAndSizeGate
from cluster.serving.http.listener import Listener
from cluster.serving.http.openapi import ERROR_RESPONSES, finish_openapi, streamed_responses
from cluster.serving.http.tools import engine_fields as tool_fields
from cluster.serving.http.tokenize import register as register_tokenizer_routes
from cluster.serving.http.responses import add_routes as register_response_routes
from cluster.serving.http.store import get_or_start_store
from cluster.serving.http.protocol import (ChatCompletionChunk, ChatCompletionRequest,
                                           ChatCompletionResponse, CompletionRequest,
                                           CompletionResponse, ErrorResponse, Health, ModelCard,
                                           ModelList)
from cluster.serving.metrics import merge_exposition
from cluster.serving.router import Router, preference, routing_key
from cluster.serving.mux import MuxedRequestStream, StreamDropped
from cluster.serving.stream import RequestStream

DEFAULT_MAX_BODY_BYTES = 4 << 20
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("shardlm.serve")


@dataclass(frozen=True)
class Settings:
    config: dict  # EngineConfig.to_dict()
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # direct ingress: the replica itself listens on (host, port) (cluster.serving.http.listener);
    # None: Serve's proxy forwards requests to it
    listen: tuple[str, int] | None = None


HEALTH_TIMEOUT_S = 2.0
PUBLIC_REASONS = {
    "starting": "loading the model onto the workers",
    "recovering": "replacing lost workers; requests wait and resume",
    "restarting": "the engine is restarting; requests wait and resume",
    "failed": "the engine failed; it tries again by itself (retry_in_s); the engine service's "
              "log says why",
    "unavailable": "the engine service is gone",
    "some_ready": "some engines are recovering; requests go to the others",
}


async def _engine_health(service) -> dict:
    """One engine service's state, with its public reason. An actor that does not answer is
    being restarted by Ray (or its node is gone)."""
    try:
        state = await asyncio.wait_for(service.health.remote(), HEALTH_TIMEOUT_S)
    except ray.exceptions.ActorDiedError:
        return {"status": "unavailable", "reason": PUBLIC_REASONS["unavailable"]}
    except (ray.exceptions.RayError, asyncio.TimeoutError):
        return {"status": "recovering", "reason": PUBLIC_REASONS["restarting"]}
    status = state.get("status")
    if status not in ("starting", "ready", "recovering", "failed"):
        return {"status": "unavailable", "reason": PUBLIC_REASONS["unavailable"]}
    public = {"status": status, "reason": PUBLIC_REASONS.get(status)}
    if isinstance(state.get("retry_in_s"), (int, float)):  # a number: it names no internals
        public["retry_in_s"] = float(state["retry_in_s"])
    return public


# ---- the deployment ------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class OpenAIServer:
    def __init__(self, settings: Settings):
        from cluster.serving.service import get_or_start_services

        self.settings = settings
        self.model = settings.served_model_name
        config = EngineConfig.from_dict(settings.config)
        self.services = get_or_start_services(config)  # one engine service per replica
        self.service = self.services[0]  # the one asked for the model's facts
        self.router = Router(len(self.services), config.deployment.routing)
        self.store = get_or_start_store(config)  # the stored responses, shared by the replicas
        # a slow streaming client's bounds (see the module docstring)
        self.buffer_bytes = config.deployment.stream_buffer_bytes
        self.stall_timeout_s = config.deployment.stream_stall_timeout_s
        self._info: dict | None = None
        if not settings.api_keys:  # Serve's logger: the line lands in the replica's log
            logging.getLogger("ray.serve").warning(
                "shardlm: no API key configured: the API is open to anyone who can reach it")
        self._app = build_app(self)  # Serve's ingress, or the replica's own listener
        self._listener = Listener(self._app, *settings.listen) if settings.listen else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    # ---- engine state ----------------------------------------------------------------------
    async def health(self) -> dict:
        """The engines' state with a short public reason: /health is open to anyone, so it
        names no process, address or error text (the services' logs have them). Ready while
        any engine is ready (requests go to the others meanwhile); else the state of the one
        that would serve soonest (the router's order). The router is told each state."""
        states = await asyncio.gather(*[_engine_health(s) for s in self.services])
        for replica, state in enumerate(states):
            self.router.observe(replica, state["status"], state.get("retry_in_s"))
        if len(states) == 1:
            return states[0]
        ready = [s for s in states if s["status"] == "ready"]
        if ready and len(ready) < len(states):
            return {"status": "ready", "reason": PUBLIC_REASONS["some_ready"]}
        return min(states, key=lambda s: (preference(s["status"]),
                                          s.get("retry_in_s", math.inf)))

    async def require_ready(self, request_id: str | None = None) -> None:
        """Requests are queued while the engine recovers; refused while it starts or failed
        (with the public reason only: health() names no internals). The engines are asked
        only when what the router was told of them is stale or no engine was ready."""
        if self.router.ready_known():
            return
        health = await self.health()
        if health["status"] not in ("ready", "recovering"):
            raise ApiError(503, f"the engine is {health['status']}: {health.get('reason')}",
                           code=f"engine_{health['status']}", request_id=request_id)

    async def model_info(self) -> dict:
        if self._info is None:
            try:
                info = await asyncio.wait_for(self.service.model_info.remote(), 10)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise internal_error(503, "engine_unavailable", None,
                                     "the engine service does not answer model_info", exc) from exc
            if not info.get("max_model_len"):
                return info
            self._info = info
        return self._info

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model!r}", "model", "model_not_found")

    # ---- generation ------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest):
        self.check_model(body.model)
        info = ResponseInfo(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model, body.n)
        await self.require_ready(info.id)
        params = body.sampling_params(body.max_tokens or 16, body.logprobs)
        if body.echo and body.logprobs is not None:  # the prompt's tokens get logprobs too
            params["prompt_logprobs"] = body.logprobs
        requests = [dict(request_id=f"{info.id}-{i}", params=params, prompt=text,
                         prompt_token_ids=ids, echo=body.echo)
                    for i, (text, ids) in enumerate(body.prompts())]
        if body.stream:
            return await self.stream(requests, CompletionStream(info, body.include_usage), "prompt")
        finals = await self.collect(requests, "prompt", info.id)
        return JSONResponse(completion_response(info, finals).model_dump(mode="json"))

    async def chat(self, body: ChatCompletionRequest):
        self.check_model(body.model)
        info = ResponseInfo(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model, body.n)
        await self.require_ready(info.id)
        params = body.sampling_params(body.max_new_tokens(), body.engine_logprobs)
        tools, constraint = tool_fields(body)
        if constraint is not None:  # tool_choice required or named
            params["structured_outputs"] = constraint
        request = dict(request_id=info.id, params=params, tools=tools,
                       messages=[m.as_template_message() for m in body.messages])
        calls = ToolMode(body.tool_mode if tools else "none",
                         body.tool_choice.function.name if body.tool_mode == "named" else None)
        if body.stream:
            return await self.stream([request], ChatStream(info, body.include_usage, calls),
                                     "messages")
        (final,) = await self.collect([request], "messages", info.id)
        return JSONResponse(chat_response(info, final, calls).model_dump(mode="json"))

    def open_streams(self, requests: list[dict], field: str, response_id: str,
                     final_logprobs: bool = True) -> list[RequestStream]:
        """One stream per request; if one cannot be sent (its text is not valid Unicode),
        none is left running and the caller gets the error. ``response_id``: the id the
        client sees (its errors name it)."""
        calls: list[RequestStream] = []
        try:
            for request in requests:
                calls.append(self._routed(request, final_logprobs))
        except Exception as exc:
            for call in calls:
                call.cancel()
            raise api_error(exc, field, response_id) from exc
        return calls

    def _routed(self, request: dict, final_logprobs: bool = True) -> RequestStream:
        """A request's stream on the engine the router picks (counted open until it ends)."""
        replica = self.router.pick(routing_key(request.get("prompt"), request.get("messages"),
                                               request.get("prompt_token_ids")))
        stream = MuxedRequestStream(self.services[replica], **request,
                                    final_logprobs=final_logprobs, buffer_bytes=self.buffer_bytes)
        self.router.opened(replica)
        stream.on_close = lambda: self.router.closed(replica)
        return stream

    async def collect(self, requests: list[dict], field: str, response_id: str) -> list[dict]:
        """Each request's ``final`` event; ``field``: the API's name of the prompt input."""
        calls = self.open_streams(requests, field, response_id)
        tasks = [asyncio.ensure_future(_final(c, field, response_id)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one failed, or the client went away: stop the others
            for task, call in zip(tasks, calls):
                task.cancel()
                call.cancel()

    async def stream(self, requests: list[dict], fmt: CompletionStream, field: str):
        """Wait for every request's admission (so that a bad one is an HTTP error, not a
        broken stream), then stream all of them as server-sent events. Each request's events
        wait in its own bounded backlog until the client takes them (``events`` holds at most
        one per request): a client that does not read holds back its own requests only, and
        is dropped (see the module docstring)."""
        # the deltas carry each token's logprobs: the final event (usage only) needs none
        response_id = fmt.meta.id
        calls = self.open_streams(requests, field, response_id, final_logprobs=False)
        firsts = [asyncio.ensure_future(_first(c, field, response_id)) for c in calls]
        try:
            first = list(await asyncio.gather(*firsts))
        except BaseException:
            for task, call in zip(firsts, calls):
                task.cancel()
                call.cancel()
            raise
        events: asyncio.Queue = asyncio.Queue(maxsize=len(calls))
        tasks = [asyncio.create_task(_pump(i, c, events, field, response_id))
                 for i, c in enumerate(calls)]

        def close() -> None:
            for task in tasks:
                task.cancel()
            for call in calls:
                call.cancel()

        async def body():
            try:
                for chunk in fmt.start():
                    yield chunk
                finals = 0
                for i, event in enumerate(first):
                    finals += event["type"] == "final"
                    for chunk in fmt.on_event(i, event):
                        yield chunk
                first.clear()
                while finals < len(calls):
                    i, event, error = await events.get()
                    if error is not None:
                        for chunk in fmt.error(error):
                            yield chunk
                        break
                    finals += event["type"] == "final"
                    for chunk in fmt.on_event(i, event):
                        yield chunk
                else:
                    for chunk in await fmt.finish():
                        yield chunk
            except Exception as exc:  # a fault of ours mid-stream (making a chunk): the
                # headers are gone, so the client learns it from an error event, not a cut
                for chunk in fmt.error(api_error(exc, field, response_id), broken=True):
                    yield chunk
            finally:  # also when the client went away or stalled: abort what still runs
                close()

        def stalled() -> None:
            log.warning(
                "request %s: its client took nothing for %.0f s (deployment."
                "stream_stall_timeout_s): its stream is dropped and its requests aborted",
                response_id, self.stall_timeout_s)

        return EventStream(body(), self.stall_timeout_s, stalled,
                           headers={"Cache-Control": "no-cache", REQUEST_ID_HEADER: response_id})


async def _final(call: RequestStream, field: str, response_id: str) -> dict:
    try:
        return await call.afinal()
    except Exception as exc:
        raise api_error(exc, field, response_id) from exc


async def _first(call: RequestStream, field: str, response_id: str) -> dict:
    """The request's first event: it has been admitted (or an error says why not)."""
    try:
        return await call.__anext__()
    except Exception as exc:
        raise api_error(exc, field, response_id) from exc


async def _pump(index: int, call: RequestStream, events: asyncio.Queue, field: str,
                response_id: str) -> None:
    """Move one request's events into ``events`` as (index, event, None), waiting while it is
    full (its events wait in the request's backlog meanwhile), or end with (index, None, the
    ApiError; api_error logs what the client is not told)."""
    try:
        async for event in call:
            await events.put((index, event, None))
    except StreamDropped as exc:  # its client fell behind (the stream's Mux logged it)
        await events.put((index, None, ApiError(408, str(exc), code="stream_dropped",
                                                request_id=response_id)))
    except Exception as exc:
        await events.put((index, None, api_error(exc, field, response_id)))


async def _while_connected(request: Request, work):
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled,
    which aborts its engine requests (``collect``'s and ``stream``'s cleanup), and nobody is
    answered. Serve's proxy cancels a handler whose client went away; uvicorn (direct
    ingress) does not: it only tells whoever awaits ``receive()``, and a non-streaming
    request waiting for its final event awaits nothing of the client's, so it would run on
    to ``max_tokens`` holding its KV blocks and its open-request slot. (A stream's response,
    once returned, watches for the disconnect itself.)"""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler cancelled (Serve's proxy saw the client go)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # its cleanup has run (this handler's own cancel still raises)
    if not task.cancelled():
        task.exception()  # retrieved: an error no one can be told of is not "never retrieved"
    return Response(status_code=499)  # nginx's "client closed request"; it is never sent


async def _disconnect(receive) -> None:
    """Return once the client has disconnected. The body has been read: the only message
    left for this request is ``http.disconnect`` (an empty last ``http.request`` at most)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- routes --------------------------------------------------------------------------------
def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="shardlm", version="0.1.0",
                  description="OpenAI-compatible API of a tensor-parallel shardlm engine")
    app.add_middleware(KeyAndSizeGate, max_body_bytes=server.settings.max_body_bytes,
                       api_keys=server.settings.api_keys)
    keyed = [Security(HTTPBearer(auto_error=False))] if server.settings.api_keys else []

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status == 503:  # an engine refused: the next request asks them all again
            server.router.doubt()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # any other fault of ours: OpenAI's shape with a fixed message, the detail logged
        # (Starlette's own answer would be a plain-text 500 with no id to look up)
        return internal_error(500, "internal_error", None,
                              f"{request.method} {request.url.path} failed: "
                              f"{type(exc).__name__}: {exc}", exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if message == "There was an error parsing the body":
            message = "the body is not valid JSON (or not UTF-8)"
        return ApiError(exc.status_code, message, code="http_error").response()

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=keyed,
              responses=streamed_responses(CompletionResponse), summary="Complete prompts")
    async def completions(body: CompletionRequest, request: Request):
        return await _while_connected(request, server.completions(body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=keyed,
              responses=streamed_responses(ChatCompletionChunk), summary="Answer a conversation")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _while_connected(request, server.chat(body))

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=[await _card(server)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=keyed,
             responses=ERROR_RESPONSES)
    async def get_model(model: str):
        server.check_model(model)
        return await _card(server)

    register_tokenizer_routes(app, server, keyed)  # POST /tokenize, /detokenize (vLLM's)
    register_response_routes(app, server, keyed, _while_connected)  # /v1/responses

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        state = await server.health()
        if state["status"] == "ready":
            return Health(**state)
        # a failed engine says when it tries again: clients need not poll before then
        retry = (max(1, math.ceil(state["retry_in_s"])) if state.get("retry_in_s")
                 else RETRY_AFTER_S)
        return JSONResponse(Health(**state).model_dump(), status_code=503,
                            headers={"Retry-After": str(retry)})

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 503: {"model": ErrorResponse}})
    async def metrics():
        try:
            texts = await asyncio.wait_for(asyncio.gather(
                *[s.metrics_text.remote() for s in server.services]), 10)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            raise internal_error(503, "engine_unavailable", None,
                                 "an engine service does not answer metrics_text", exc) from exc
        return PlainTextResponse(merge_exposition(texts), media_type=METRICS_CONTENT_TYPE)

    generate = app.openapi
    app.openapi = lambda: finish_openapi(generate(), server.model)
    return app


async def _card(server: OpenAIServer) -> ModelCard:
    try:
        info = await server.model_info()
    except ApiError:
        info = {}
    return ModelCard(id=server.model, created=int(info.get("created") or time.time()),
                     max_model_len=info.get("max_model_len"))
