"""The HTTP gate: API keys and body size, answered before a route reads anything."""

from __future__ import annotations

import hmac

from cluster.serving.http.format import ApiError

MAX_DRAIN_BYTES = 64 << 20  # read (and drop) at most this much of a refused body
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


class KeyAndSizeGate:
    """ASGI middleware: when keys are set, 401 without a valid ``Authorization: Bearer`` key
    on every path but :data:`OPEN_PATHS` (probes, scrapers, the API's description); 413 for
    a body over ``max_body_bytes`` (declared or actually sent)."""

    def __init__(self, app, max_body_bytes: int, api_keys: tuple[str, ...] = ()):
        self.app, self.limit = app, max_body_bytes
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if self.keys and path not in OPEN_PATHS and not self._authorized(headers):
            return await _send(send, ApiError(401, "a valid API key is required: send "
                                              "'Authorization: Bearer <key>'", code="invalid_api_key"))
        limit = self.limit
        try:
            declared = int(headers.get("content-length", b"0"))
        except ValueError:
            return await _send(send, ApiError(400, "Content-Length is not a number"))
        if declared > limit:
            await _drain(receive, declared)
            return await _send(send, _too_large(limit))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                if more:
                    await _drain(receive, MAX_DRAIN_BYTES)
                return await _send(send, _too_large(limit))
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_again, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        ok = False
        for key in self.keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over the server's limit of {limit} bytes",
                    code="request_too_large")


async def _drain(receive, at_most: int) -> None:
    seen = 0
    while seen < min(at_most, MAX_DRAIN_BYTES):
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send(send, error: ApiError) -> None:
    response = error.response()
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
