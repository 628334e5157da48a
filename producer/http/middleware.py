"""Plain-ASGI middleware of the facade: JSON bodies whatever their content type, the body size
limit, the request metrics, and a request whose client went away cancelled.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: no task and no body copy per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import HTTPException

from producer.http.errors import error_response, too_large
from producer.http.metrics import FacadeMetrics

log = logging.getLogger(__name__)

def header(scope: dict[str, Any], name: bytes) -> bytes:
    """The first value of the request header ``name`` (lower-case, as ASGI names them), b"" if
    none: the one lookup the middleware and the hot routes (``producer.http.fast``) share."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return b""


API_PATHS = ("/embeddings", "/rerank", "/classify", "/models", "/embed", "/embed_all", "/predict", "/similarity",
             "/tokenize", "/decode", "/info")
KNOWN_PATHS = ({prefix + path for prefix in ("", "/v1") for path in API_PATHS}
               | {"/", "/health", "/metrics", "/v2/embed", "/v2/rerank"})


class AssumeJson:
    """Every API body is JSON: a POST sent without a JSON content type (``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``) is read as JSON instead of failing as "not an object".
    A body that is not JSON still gets a 400 saying so."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            given = header(scope, b"content-type")
            if not given.split(b";")[0].strip().lower().endswith((b"/json", b"+json")):
                headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class CancelOnDisconnect:
    """A client that hangs up before its answer cancels its request's handler: the request stops
    waiting, which cancels its job (``producer.http.coalesce``) and, in an embedded server, the
    engine drops what of it has not run (``worker.engine.pipeline``). The metrics record 499
    (nginx's "client closed request"). Only POST requests (the API calls) are watched, and only
    once their body is read: a watch is one small task waiting on the server's ``receive``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        responded = gone = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not responded and task is not None:
                gone = True
                task.cancel()

        async def read() -> dict[str, Any]:
            nonlocal watcher
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False) and watcher is None:
                watcher = asyncio.ensure_future(watch())
            return message

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal responded
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, read, tracked)
        except asyncio.CancelledError:
            if not gone or task is None or task.uncancel() > 0:
                raise
            log.debug("the client of %s went away before its answer: request cancelled", scope.get("path"))
            await send({"type": "http.response.start", "status": 499, "headers": []})  # the server drops it
            await send({"type": "http.response.body", "body": b""})
        finally:
            if watcher is not None:
                watcher.cancel()


class BodyLimit:
    """413 for bodies over the limit, by header and while reading (chunked bodies too)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")  # uvicorn's parsers refuse two differing ones
        if length.isdigit() and int(length) > self.limit:
            response = error_response(self._error())
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited, send)

    def _error(self) -> Any:
        return too_large(f"the request body exceeds the limit of {self.limit} bytes")


class Observe:
    """Requests and latency per route and status (plain ASGI: no per-request task or body copy)."""

    def __init__(self, app: Any, metrics: FacadeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = scope.get("path", "")
            route = path if path in KNOWN_PATHS else "other"  # bounded label values
            self.metrics.observe(route, status, time.perf_counter() - started)

