"""The OpenAI-compatible HTTP API: a Ray Serve application with a FastAPI ingress.

Each replica is a thin HTTP front: it validates requests (:mod:`cluster.openai_protocol`),
forwards them to the engine service (the detached actor of :mod:`cluster.engine_service`,
created on first use) and turns its events into OpenAI responses
(:mod:`cluster.openai_format`). Routes: ``POST /v1/completions``, ``POST
/v1/chat/completions`` (both with ``stream: true`` as server-sent events), ``GET
/v1/models``, ``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``, and FastAPI's
``/openapi.json`` and ``/docs``.

- API keys (``api_key``/``api_keys`` or ``$SHARDLM_API_KEY``, comma-separated) guard
  ``/v1/*`` with ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open
  for probes and scrapers. Without keys the API is open, and the replica logs so.
- Bodies over ``max_body_bytes`` (default 4 MiB: a full 128K-token context as text or as
  token ids, with room to spare) get 413 before any route reads them.
- Errors have OpenAI's shape ``{"error": {message, type, param, code}}``: 400 bad input,
  401 key, 404 model, 413 body, 503 (with ``Retry-After``) while the engine starts or failed.
- A streaming client that disconnects aborts its request; its KV blocks are freed.

KubeRay's ``serveConfigV2`` names ``cluster.serve:app_builder``; ``shardlm serve`` calls
:func:`deploy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException

from cluster.config import SECTIONS, EngineConfig
from cluster.openai_format import (ApiError, ChatStream, CompletionStream, Guard, Meta, chat_response,
                                   completion_response, sse, validation_error)
from cluster.openai_protocol import (ERROR_RESPONSES, ChatCompletionChunk, ChatCompletionRequest,
                                     ChatCompletionResponse, CompletionRequest, CompletionResponse,
                                     ErrorResponse, Health, ModelCard, ModelList, finish_openapi,
                                     streamed_responses)
from cluster.service_call import ServiceCall, until_final

log = logging.getLogger("shardlm.serve")
DEFAULT_MAX_BODY_BYTES = 4 << 20
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READY_TTL_S = 2.0  # a replica trusts a "ready" answer this long before asking again


@dataclass(frozen=True)
class Settings:
    config: dict  # EngineConfig.to_dict()
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


# ---- the deployment ------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class OpenAIServer:
    def __init__(self, settings: Settings):
        from cluster.engine_service import get_or_start_service

        self.settings = settings
        self.model = settings.served_model_name
        self.service = get_or_start_service(EngineConfig.from_dict(settings.config))
        self._ready_at = -1e9
        self._info: dict | None = None
        if not settings.api_keys:  # Serve's logger: the line lands in the replica's log
            logging.getLogger("ray.serve").warning(
                "shardlm: no API key configured: the API is open to anyone who can reach it")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self)

    # ---- engine state ----------------------------------------------------------------------
    async def health(self) -> dict:
        try:
            state = await asyncio.wait_for(self.service.health.remote(), 10)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            return {"status": "unavailable", "reason": f"the engine service does not answer: {exc}"}
        if state.get("status") not in ("starting", "ready", "recovering", "failed"):
            return {"status": "unavailable", "reason": f"unknown engine state {state!r}"}
        return state

    async def require_ready(self) -> None:
        """Requests are queued while the engine recovers; refused while it starts or failed."""
        if time.monotonic() - self._ready_at < READY_TTL_S:
            return
        health = await self.health()
        if health["status"] == "ready":
            self._ready_at = time.monotonic()
        elif health["status"] != "recovering":
            raise ApiError(503, f"the engine is {health['status']}: {health.get('reason')}",
                           code=f"engine_{health['status']}")

    async def model_info(self) -> dict:
        if self._info is None:
            try:
                info = await asyncio.wait_for(self.service.model_info.remote(), 10)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise ApiError(503, f"the engine service does not answer: {exc}") from exc
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
        await self.require_ready()
        meta = Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model, body.n)
        params = body.sampling_params(body.max_tokens or 16, body.logprobs)
        requests = [_request(f"{meta.id}-{i}", params, prompt=text, prompt_token_ids=ids)
                    for i, (text, ids) in enumerate(body.prompts())]
        if body.stream:
            return await self.stream(requests, CompletionStream(meta, body.include_usage), "prompt")
        finals = await self.collect(requests, "prompt")
        return JSONResponse(completion_response(meta, finals).model_dump(mode="json"))

    async def chat(self, body: ChatCompletionRequest):
        self.check_model(body.model)
        await self.require_ready()
        context = (await self.model_info()).get("max_model_len")
        if not context:
            raise ApiError(503, "the engine is not ready", code="engine_starting")
        meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model, body.n)
        params = body.sampling_params(body.max_new_tokens(context), body.engine_logprobs)
        request = _request(meta.id, params, messages=[m.as_template_message() for m in body.messages])
        if body.stream:
            return await self.stream([request], ChatStream(meta, body.include_usage), "messages")
        (final,) = await self.collect([request], "messages")
        return JSONResponse(chat_response(meta, final).model_dump(mode="json"))

    async def collect(self, requests: list[dict], param: str) -> list[dict]:
        calls = [ServiceCall(self.service, r, param) for r in requests]
        tasks = [asyncio.ensure_future(until_final(c)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one failed, or the client went away: stop the others
            for task, call in zip(tasks, calls):
                task.cancel()
                call.cancel()

    async def stream(self, requests: list[dict], fmt: CompletionStream, param: str):
        """Wait for every request's admission (so that a bad one is an HTTP error, not a
        broken stream), then stream all of them as server-sent events."""
        calls = [ServiceCall(self.service, r, param) for r in requests]
        events: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, c, events)) for i, c in enumerate(calls)]

        def close() -> None:
            for task in tasks:
                task.cancel()
            for call in calls:
                call.cancel()

        first: list[tuple[int, dict]] = []
        try:
            while len({i for i, _ in first}) < len(calls):
                i, event, error = await events.get()
                if error is not None:
                    raise error
                first.append((i, event))
        except BaseException:
            close()
            raise

        async def body():
            try:
                for chunk in fmt.start():
                    yield chunk
                pending, finals = list(first), 0
                while finals < len(calls):
                    if pending:
                        i, event = pending.pop(0)
                    else:
                        i, event, error = await events.get()
                        if error is not None:
                            yield sse(error.body())
                            break
                    finals += event["type"] == "final"
                    for chunk in fmt.on_event(i, event):
                        yield chunk
                else:
                    for chunk in fmt.end():
                        yield chunk
                yield sse("[DONE]")
            finally:  # also when the client went away: abort what still runs
                close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


async def _pump(index: int, call: ServiceCall, events: asyncio.Queue) -> None:
    try:
        while True:
            event = await call.next()
            events.put_nowait((index, event, None))
            if event["type"] == "final":
                return
    except ApiError as exc:
        events.put_nowait((index, None, exc))
    except Exception as exc:
        log.exception("engine stream failed")
        events.put_nowait((index, None, ApiError(500, f"internal error: {exc}", code="internal_error")))


def _request(request_id: str, params: dict, prompt=None, prompt_token_ids=None, messages=None) -> dict:
    return {"request_id": request_id, "prompt": prompt, "prompt_token_ids": prompt_token_ids,
            "messages": messages, "params": params, "priority": 0}


# ---- routes --------------------------------------------------------------------------------
def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="shardlm", version="0.1.0",
                  description="OpenAI-compatible API of a tensor-parallel shardlm engine")
    app.add_middleware(Guard, max_body_bytes=server.settings.max_body_bytes,
                       api_keys=server.settings.api_keys)
    keyed = [Security(HTTPBearer(auto_error=False))] if server.settings.api_keys else []

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if message == "There was an error parsing the body":
            message = "the body is not valid JSON (or not UTF-8)"
        return ApiError(exc.status_code, message, code="http_error").response()

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=keyed,
              responses=streamed_responses(CompletionResponse), summary="Complete prompts")
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=keyed,
              responses=streamed_responses(ChatCompletionChunk), summary="Answer a conversation")
    async def chat_completions(body: ChatCompletionRequest):
        return await server.chat(body)

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=[await _card(server)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=keyed,
             responses=ERROR_RESPONSES)
    async def get_model(model: str):
        server.check_model(model)
        return await _card(server)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        state = await server.health()
        if state["status"] == "ready":
            return Health(**state)
        return JSONResponse(Health(**state).model_dump(), status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 503: {"model": ErrorResponse}})
    async def metrics():
        try:
            text = await asyncio.wait_for(server.service.metrics_text.remote(), 10)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            raise ApiError(503, f"the engine service does not answer: {exc}") from exc
        return PlainTextResponse(text, media_type=METRICS_CONTENT_TYPE)

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


# ---- building and deploying ----------------------------------------------------------------
def build(config: EngineConfig, api_keys=None, served_model_name: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, num_replicas: int = 1) -> serve.Application:
    """The Serve application for ``config``; keys from ``api_keys`` plus ``$SHARDLM_API_KEY``."""
    keys = _keys(api_keys) + _keys(os.environ.get("SHARDLM_API_KEY"))
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: must be a positive integer")
    settings = Settings(config.to_dict(), served_model_name or config.model.model,
                        tuple(dict.fromkeys(keys)), max_body_bytes)
    return OpenAIServer.options(num_replicas=num_replicas).bind(settings)


def app_builder(args: dict) -> serve.Application:
    """Serve's application builder. ``args``: ``config`` (YAML path), any EngineConfig field
    as an override (``model``, ``tensor_parallel_size``, ...), ``api_key``/``api_keys``,
    ``served_model_name``, ``max_body_bytes``, ``num_replicas``. Strings from ``serve run
    ... key=value`` are parsed as YAML scalars for non-string fields."""
    args = dict(args or {})
    path = args.pop("config", None)
    keys = _keys(args.pop("api_key", None)) + _keys(args.pop("api_keys", None))
    served = args.pop("served_model_name", None)
    max_body = _scalar(args.pop("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    replicas = _scalar(args.pop("num_replicas", 1))
    config = EngineConfig.from_yaml(path) if path else EngineConfig()
    config = config.with_overrides(**{k: _coerce(k, v) for k, v in args.items()})
    return build(config, keys, served, max_body, replicas)


def deploy(config: EngineConfig | str | Path, host: str = "127.0.0.1", port: int = 8000,
           api_keys=None, blocking: bool = False, **kwargs) -> str:
    """Start Serve's proxy on ``host:port`` and run the API there; the base URL."""
    from cluster.ray_utils import connect_ray

    config = config if isinstance(config, EngineConfig) else EngineConfig.from_yaml(config)
    connect_ray(config.deployment.ray_address)
    serve.start(http_options={"host": host, "port": port})
    url = f"http://{host}:{port}/v1"
    log.info("OpenAI API for %s at %s (%s)", config.model.model, url,
             "API keys required" if _keys(api_keys) or os.environ.get("SHARDLM_API_KEY")
             else "open: no API key configured")
    serve.run(build(config, api_keys, **kwargs), name=config.deployment.name, route_prefix="/",
              blocking=blocking)
    return url


def shutdown(name: str = "shardlm", namespace: str = "shardlm") -> None:
    """Stop Serve and the engine service ``name``."""
    from cluster.engine_service import stop_service

    serve.shutdown()
    stop_service(name, namespace)


def _keys(value) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(k).strip() for k in items if str(k).strip()]


def _scalar(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


def _coerce(name: str, value):
    """``"2"`` -> 2 for an int field; strings stay strings for string fields."""
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            if f.name == name and isinstance(value, str) and not str(f.type).startswith("str"):
                return yaml.safe_load(value)
    return value
