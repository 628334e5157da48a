"""What a facade reveals without its API key, and what it answers with no worker at all."""

from __future__ import annotations

from fastapi.testclient import TestClient

from producer.client import Client
from producer.http.app import create_app
from producer.http.settings import FacadeSettings
from tests.conftest import RedisServer

KEY = {"Authorization": "Bearer k3y"}


def test_with_no_worker_up_a_thin_facade_answers_503_not_404(redis_server: RedisServer) -> None:
    with TestClient(create_app(Client(broker=redis_server.url), FacadeSettings(refresh_s=1.0))) as client:
        for body in ({"input": "a"}, {"input": "a", "model": "anything"}):
            response = client.post("/v1/embeddings", json=body)
            assert response.status_code == 503 and response.json()["error"]["code"] == "no_worker", response.text
            assert response.headers.get("retry-after")
        assert client.post("/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 503


def test_docs_and_schema_need_the_key_metrics_only_when_protected(redis_server: RedisServer) -> None:
    for protect in (False, True):
        settings = FacadeSettings(api_key="k3y", refresh_s=1.0, protect_metrics=protect)
        with TestClient(create_app(Client(broker=redis_server.url), settings)) as client:
            for path in ("/openapi.json", "/docs"):
                assert client.get(path).status_code == 401
                assert client.get(path, headers=KEY).status_code == 200
            assert client.get("/openapi.json", headers=KEY).json()["paths"]["/v1/embeddings"]
            assert client.get("/metrics").status_code == (401 if protect else 200)
            assert client.get("/metrics", headers=KEY).status_code == 200
            assert client.get("/health").status_code == 503  # open for probes: no worker, not ready
    with TestClient(create_app(Client(broker=redis_server.url), FacadeSettings(refresh_s=1.0))) as client:
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
