"""API key, backpressure (429), timeouts (504), readiness, and discovery without broadcast."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from fastapi.testclient import TestClient

from producer.client import Client
from producer.http.app import create_app
from producer.http.settings import FacadeSettings
from tests.conftest import RedisServer
from tests.http.servers import Served, WorkerProcess, wait_ready


def test_api_key_guards_api_routes_but_not_health(embedded: Served) -> None:
    app = create_app(Client(app=embedded.worker_app), FacadeSettings(api_key="s3cret", refresh_s=1.0))
    with TestClient(app) as client:
        body = {"input": "hello", "model": embedded.embed}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.post("/v1/embeddings", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 32
        assert client.get("/health").status_code == 200
        assert "embedfleet_http_requests_total" in client.get("/metrics").text


def test_metrics_count_requests_tokens_and_queue_depth(thin: Served, redis_module: RedisServer) -> None:
    import redis

    httpx.post(f"{thin.url}/v1/embeddings", json={"input": ["count me", "and me"], "model": thin.embed})
    time.sleep(1.5)
    # delivered results are deleted from Redis (after the answer), not left to expire in an hour
    assert redis.Redis(port=redis_module.port).keys("celery-task-meta-*") == []
    text = httpx.get(f"{thin.url}/metrics").text
    assert 'embedfleet_http_requests_total{route="/v1/embeddings",status="200"}' in text
    assert 'embedfleet_tokens_total{kind="embed",model="tiny-bert"}' in text
    assert 'embedfleet_queue_depth{queue="embed.tiny-bert"} 0.0' in text
    assert 'embedfleet_queue_depth{queue="embed.tiny-bert.inline"} 0.0' in text
    assert 'embedfleet_workers{kind="embed",model="tiny-bert"} 1.0' in text


def test_discovery_through_the_info_task(thin: Served, redis_module: RedisServer) -> None:
    """Transports without broadcast (SQS) ask each wanted model's queue instead."""
    settings = FacadeSettings(models=["embed:tiny-bert"], discovery="task", discovery_timeout_s=5)
    with TestClient(create_app(Client(broker=redis_module.url), settings)) as client:
        assert client.get("/health").status_code == 200
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-bert"]
        response = client.post("/v1/embeddings", json={"input": "via the info task"})
        assert response.status_code == 200, response.text


def test_dead_worker_gives_504_backpressure_gives_429(thin: Served, redis_module: RedisServer,
                                                      fleet_worker: WorkerProcess, tiny_embed_model: Any,
                                                      tmp_path: Any) -> None:
    """A second worker is killed after the facade saw it: requests time out instead of hanging,
    and while one waits, the next is refused (max_inflight=1), then refused by queue depth."""
    # This facade only knows of a model served by the worker we kill.
    doomed = WorkerProcess(redis_module.url, [f"{tiny_embed_model}"], tmp_path / "w.log")
    fleet_worker.stop()  # the shared worker would answer for tiny-bert: stop it for this test
    try:
        doomed.start()
        settings = FacadeSettings(timeout_s=1.5, max_inflight=1, max_queue_depth=1, refresh_s=300)
        server_app = create_app(Client(broker=redis_module.url), settings)
        with TestClient(server_app) as client:
            deadline = time.monotonic() + 120
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, doomed.log.read_text()[-2000:]
                server_app.state.facade.directory.refresh()
            doomed.kill()
            results: dict[str, int] = {}

            def slow() -> None:
                results["first"] = client.post("/v1/embeddings", json={"input": "nobody answers"}).status_code

            thread = threading.Thread(target=slow)
            thread.start()
            time.sleep(0.5)
            busy = client.post("/v1/embeddings", json={"input": "too many"})
            thread.join()
            assert results["first"] == 504
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "overloaded"
            # two expired jobs now sit in the queue: over max_queue_depth=1 -> refused up front
            client.post("/v1/embeddings", json={"input": "queue it"})
            time.sleep(1.0)  # the depth is sampled every 0.5 s
            refused = client.post("/v1/embeddings", json={"input": "refused by depth"})
            assert refused.status_code == 429 and "queue embed.tiny-bert.inline" in refused.json()["error"]["message"]
    finally:
        doomed.kill()
        fleet_worker.start()
    wait_ready(thin.url, proc=fleet_worker.proc, log=fleet_worker.log)


def test_health_not_ready_without_workers(redis_server: RedisServer) -> None:
    settings = FacadeSettings(models=["tiny-bert"], refresh_s=1.0)
    with TestClient(create_app(Client(broker=redis_server.url), settings)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["missing"] == ["tiny-bert"]
        response = client.post("/v1/embeddings", json={"input": "a", "model": "tiny-bert"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_worker"
