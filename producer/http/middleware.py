"""Plain-ASGI middleware of the facade: JSON bodies whatever their content type, the body size
limit and the request metrics.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: no task and no body copy per request.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import HTTPException

from producer.http.errors import error_response, too_large
from producer.http.metrics import FacadeMetrics

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
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            given = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            if not given.split(b";")[0].strip().lower().endswith((b"/json", b"+json")):
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over the limit, by header and while reading (chunked bodies too)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
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

