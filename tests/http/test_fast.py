"""The plain-ASGI hot routes (producer.http.fast): valid bodies answered there, every other body
judged by FastAPI with the same bytes, and the limits and errors of the full path kept."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from producer.client import Client
from producer.errors import EmbedfleetError
from producer.http.app import create_app
from producer.http.errors import overloaded, timed_out, unauthorized
from producer.http.fast import FastRoutes
from producer.http.render import json_response
from producer.http.schemas import EmbeddingRequest
from producer.http.settings import FacadeSettings
from tests.http.servers import Served, ServerThread, wait_ready


class FakeFacade:
    """The two things the fast route asks of a facade: the key check and the handler."""

    def __init__(self, key: str | None = None, fails: EmbedfleetError | None = None) -> None:
        self.key = key
        self.fails = fails
        self.bodies: list[EmbeddingRequest] = []

    def check_key(self, header: str) -> None:
        if self.key is not None and header != f"Bearer {self.key}":
            raise unauthorized()

    async def embeddings(self, body: EmbeddingRequest) -> Any:
        self.bodies.append(body)
        if self.fails is not None:
            raise self.fails
        return json_response({"fast": True})


class Inner:
    """The app behind the fast route (FastAPI in the facade): records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.bodies.append(b"".join(chunks))
        await json_response({"inner": True})(scope, receive, send)


def call(app: Any, body: bytes, path: str = "/v1/embeddings", method: str = "POST",
         headers: list[tuple[bytes, bytes]] | None = None, chunks: int = 1) -> tuple[int, dict[str, str], bytes]:
    """One request through ``app`` with the body in ``chunks`` parts; (status, headers, body)."""
    step = max(1, -(-len(body) // chunks))
    parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    incoming = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    head = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], head, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_valid_body_is_answered_by_the_fast_route_with_every_field_as_the_model_reads_it() -> None:
    facade, inner = FakeFacade(), Inner()
    app = FastRoutes(inner, facade)  # type: ignore[arg-type]
    body = b'{"input": ["a", "b"], "model": "m", "encoding_format": "base64", "dimensions": 8, "user": "u", "x": 1}'
    status, _, answer = call(app, body, chunks=3)
    assert (status, answer, inner.bodies) == (200, b'{"fast":true}', [])
    got = facade.bodies[0]
    assert (got.input, got.model, got.encoding_format, got.dimensions, got.truncation) == (["a", "b"], "m", "base64",
                                                                                          8, True)


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"input": 5}', b'{"input": ""}', b'[1, 2]',
                                  b'{"input": "a", "encoding_format": "utf8"}', b'{"input": "a", "dimensions": 1.5}'])
def test_a_body_that_does_not_parse_or_validate_goes_to_the_full_path_unchanged(body: bytes) -> None:
    facade, inner = FakeFacade(), Inner()
    status, _, answer = call(FastRoutes(inner, facade), body, chunks=2)  # type: ignore[arg-type]
    assert (status, answer, inner.bodies, facade.bodies) == (200, b'{"inner":true}', [body], [])


def test_other_paths_and_methods_are_not_taken() -> None:
    facade, inner = FakeFacade(), Inner()
    app = FastRoutes(inner, facade)  # type: ignore[arg-type]
    assert call(app, b'{"input": "a"}', path="/v1/rerank")[2] == b'{"inner":true}'
    assert call(app, b'{"input": "a"}', path="/v1/embeddings/")[2] == b'{"inner":true}'
    assert call(app, b"", method="GET")[2] == b'{"inner":true}'
    assert facade.bodies == []


def test_the_key_is_checked_before_any_work_and_errors_keep_their_status_and_headers() -> None:
    inner = Inner()
    keyed = FastRoutes(inner, FakeFacade(key="k"))  # type: ignore[arg-type]
    status, headers, answer = call(keyed, b'{"input": "a"}', headers=[(b"authorization", b"Bearer no")])
    assert status == 401 and headers["www-authenticate"] == "Bearer" and b"invalid_api_key" in answer
    assert call(keyed, b'{"input": "a"}', headers=[(b"authorization", b"Bearer k")])[2] == b'{"fast":true}'
    for error, expected in ((overloaded("busy"), 429), (timed_out("m", 1.0), 504)):
        status, headers, answer = call(FastRoutes(inner, FakeFacade(fails=error)), b'{"input": "a"}')  # type: ignore[arg-type]
        assert status == expected and error.public_code.encode() in answer
    assert call(FastRoutes(inner, FakeFacade(fails=overloaded("busy"))), b'{"input": "a"}')[1]["retry-after"] == "1"  # type: ignore[arg-type]
    assert inner.bodies == []


@pytest.fixture(scope="module")
def limited(embedded: Served) -> Iterator[tuple[str, Any]]:
    """An embedded facade with a key and a 2 KiB body limit."""
    app = create_app(Client(app=embedded.worker_app), FacadeSettings(api_key="s3cret", max_body_bytes=2048,
                                                                     max_request_tokens=600, refresh_s=1.0))
    server = ServerThread(app).start()
    wait_ready(server.url)
    yield server.url, embedded
    server.stop()


KEY = {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings", "/embed", "/v1/embed"])
def test_limits_hold_on_the_hot_routes(limited: tuple[str, Any], path: str) -> None:
    url, embedded = limited
    field = "inputs" if path.endswith("/embed") else "input"
    ok = httpx.post(url + path, json={field: "fine", "model": embedded.bundled}, headers=KEY)
    assert ok.status_code == 200, ok.text
    assert httpx.post(url + path, json={field: "fine"}).status_code == 401
    big = httpx.post(url + path, json={field: "x" * 4000}, headers=KEY)  # by its Content-Length
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is hit while reading
        yield b'{"' + field.encode() + b'": "'
        for _ in range(8):
            yield b"y" * 512
        yield b'"}'

    streamed = httpx.post(url + path, content=chunked(), headers=KEY)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    tokens = httpx.post(url + path, json={field: ["word " * 60] * 5, "model": embedded.bundled}, headers=KEY)
    assert tokens.status_code == 413 and tokens.json()["error"]["param"] == field, tokens.text
    invalid = httpx.post(url + path, json={field: 5}, headers=KEY)
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == field


def test_the_tei_route_answers_the_openai_routes_vectors_and_metrics_count_both(limited: tuple[str, Any]) -> None:
    url, embedded = limited
    texts = ["a first text", "and a second"]
    openai = httpx.post(f"{url}/v1/embeddings", json={"input": texts, "model": embedded.bundled}, headers=KEY).json()
    tei = httpx.post(f"{url}/embed", json={"inputs": texts, "model": embedded.bundled}, headers=KEY).json()
    assert np.allclose(np.array([d["embedding"] for d in openai["data"]]), np.array(tei), atol=1e-6)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'embedfleet_http_requests_total{route="/v1/embeddings",status="200"}' in metrics
    assert 'embedfleet_http_requests_total{route="/embed",status="200"}' in metrics


def test_the_hot_routes_stay_in_the_schema(embedded: Served) -> None:
    with TestClient(create_app(Client(app=embedded.worker_app), FacadeSettings(refresh_s=1.0))) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embeddings", "/embeddings", "/embed", "/v1/embed"} <= set(paths)
