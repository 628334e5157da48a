"""The hot calls in plain ASGI: ``/v1/embeddings``, ``/embeddings`` and TEI's ``/embed`` without FastAPI.

Under load, FastAPI's machinery around a route cost about half of a facade process's time:
routing over every route, the ``Request`` object, ``solve_dependencies`` (the key check is a
dependency), the body read through it, the exception middleware and the exit stack
(bench/RESULTS.md, issue 20). ``FastRoutes`` sits inside the facade's own middleware (metrics,
body limit, JSON content type, cancel on hang-up, all plain ASGI and unchanged) and answers a
POST to one of these paths itself: the body read once, parsed by orjson, checked by the very
pydantic model FastAPI would use (so every field rule is the route's own), the key checked, then
the same handler (``Facade.embeddings``, ``tei.embed``) with every limit and error it has.

A body that does not parse or validate is handed to FastAPI unchanged (the read body replayed),
so every 4xx message is the one the full path gives, written in one place; only valid requests,
the ones that cost the fleet work, take the short way.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from producer.errors import EmbedfleetError
from producer.http import tei
from producer.http.errors import error_response, plain_response
from producer.http.facade import Facade
from producer.http.middleware import header
from producer.http.schemas import EmbeddingRequest, TEIEmbedRequest

log = logging.getLogger(__name__)

Handler = Callable[[Facade, Any], Awaitable[Response]]


async def _openai(facade: Facade, body: EmbeddingRequest) -> Response:
    return await facade.embeddings(body)


#: path -> (the body's model, its handler); the same handlers FastAPI's routes call.
HOT: dict[str, tuple[type[BaseModel], Handler]] = {
    **{prefix + "/embeddings": (EmbeddingRequest, _openai) for prefix in ("", "/v1")},
    **{prefix + "/embed": (TEIEmbedRequest, tei.embed) for prefix in ("", "/v1")},
}


class FastRoutes:
    """Plain-ASGI answers for the hot paths; everything else goes to ``app`` (FastAPI)."""

    def __init__(self, app: Any, facade: Facade) -> None:
        self.app = app
        self.facade = facade

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = HOT.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            raw = await _read_body(receive)
        except HTTPException as exc:  # the body limit, hit while reading
            await plain_response(exc.status_code, str(exc.detail))(scope, receive, send)
            return
        if raw is None:  # the client went away before its body was sent: nobody to answer
            return
        response = await self._answer(scope, raw, *route)
        if response is None:  # not parsed or not valid: FastAPI answers with its exact message
            await self.app(scope, _replay(raw, receive), send)
            return
        await response(scope, receive, send)

    async def _answer(self, scope: dict[str, Any], raw: bytes, shape: type[BaseModel],
                      handler: Handler) -> Response | None:
        """The route's answer, or None when the full path should judge the body."""
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        try:
            self.facade.check_key(header(scope, b"authorization").decode("latin-1"))  # before the body, as FastAPI orders them
            try:
                body = shape.model_validate(parsed)
            except ValidationError:
                return None
            return await handler(self.facade, body)
        except EmbedfleetError as exc:
            return error_response(exc)
        except Exception as exc:  # as the app's own handler answers it
            log.exception("unexpected error")
            return plain_response(500, f"internal error: {type(exc).__name__}")


async def _read_body(receive: Any) -> bytes | None:
    """The whole body; None if the client hung up first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` that gives the already-read body first, then the server's own messages."""
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed

