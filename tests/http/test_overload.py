"""The facade under load: a per-request token budget (413), per-request deadlines, and work nobody
waits for dropped in the engine instead of computed.

Facades here sit on the session's embedded worker (real uvicorn, real HTTP, the bundled
all-MiniLM-L6-v2 in this process), with their own limits: a small token budget, a short timeout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from producer.jobs import JobKind
from tests.conftest import RedisServer
from tests.http.servers import Served, ServerThread, wait_ready

#: ~250 tokens of the bundled model's vocabulary; 1,300 bytes (the estimate caps it at 256).
LONG = " ".join(f"benchmark sentence {i} about embedding servers under load" for i in range(26))


def facade(embedded: Served, bundled_model: Path, direct: bool, **limits: object) -> ServerThread:
    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings
    from worker.hosting import registry
    from worker.hosting.direct import EngineRunner

    settings = FacadeSettings(models=[str(bundled_model)], refresh_s=1.0, **limits)  # type: ignore[arg-type]
    runner = EngineRunner(registry.of(embedded.worker_app)) if direct else None
    app = create_app(Client(app=embedded.worker_app), settings, runner=runner)
    server = ServerThread(app).start()
    wait_ready(server.url)
    return server


@pytest.fixture(scope="module")
def budgeted(embedded: Served, bundled_model: Path) -> Iterator[str]:
    server = facade(embedded, bundled_model, True, max_request_tokens=1000)
    yield server.url
    server.stop()


def test_a_request_over_the_token_budget_is_a_413_naming_the_field_and_the_limit(budgeted: str) -> None:
    """Eight inputs of 256 tokens each (2,048 > 1,000) are refused before any work; the same
    count of short inputs, and four long ones, fit; the other routes count too."""
    over = httpx.post(f"{budgeted}/v1/embeddings", json={"input": [LONG] * 8}, timeout=60)
    assert over.status_code == 413, over.text
    error = over.json()["error"]
    assert error["param"] == "input" and error["code"] == "request_too_large"
    assert "2,048 tokens" in error["message"] and "limit of 1,000" in error["message"]
    short = httpx.post(f"{budgeted}/v1/embeddings", json={"input": ["a short text"] * 8}, timeout=60)
    assert short.status_code == 200, short.text
    fits = httpx.post(f"{budgeted}/v1/embeddings", json={"input": [LONG] * 3}, timeout=60)
    assert fits.status_code == 200, fits.text
    tei = httpx.post(f"{budgeted}/embed", json={"inputs": [LONG] * 8}, timeout=60)
    assert tei.status_code == 413 and "limit of 1,000" in tei.text
    cohere = httpx.post(f"{budgeted}/v2/embed", json={"texts": [LONG] * 8, "model": "all-MiniLM-L6-v2",
                                                      "input_type": "search_document",
                                                      "embedding_types": ["float"]}, timeout=60)
    assert cohere.status_code == 413 and "limit of 1,000" in cohere.text


def test_the_estimate_never_counts_fewer_tokens_than_the_tokenizer(bundled_model: Path) -> None:
    """One token per UTF-8 byte plus the special tokens, at most the model's maximum, bounds
    what the model's own tokenizer gives, on prose, punctuation, digits, CJK and emoji."""
    from producer.http.checks import estimated_tokens
    from worker.models.tokenizer import BatchTokenizer

    texts = [LONG, "!!!!!!!!", "1 2 3 4 5 6", "東京都の天気", "🙂🙃🙂 ok", "a", "x" * 3000,
             "naïve café déjà vu", "  spaced   out  "]
    tokenizer = BatchTokenizer(bundled_model, 256)
    for text, encoded in zip(texts, tokenizer.encode(texts)):
        assert estimated_tokens([text], 256) >= encoded.n_tokens, text
    assert estimated_tokens([[1, 2, 3]], 256) == 5 and estimated_tokens([("ab", "cd")], 256) == 7


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "task"])
def test_a_timed_out_request_is_dropped_in_the_engine_and_others_are_answered(
        embedded: Served, bundled_model: Path, direct: bool) -> None:
    """A 2,048 x 256-token request (far more than 1.5 s of work on a CPU) gets its 504 and its
    remaining inputs are dropped in the engine, not computed; a single text is answered after.
    ``direct``: the embedded facade's own engine call; ``task``: the job as an inline message
    (the worker hands the engine the message's deadline)."""
    from worker.hosting import registry

    engine = registry.of(embedded.worker_app).engine_for(str(bundled_model), JobKind.embed)
    server = facade(embedded, bundled_model, direct, timeout_s=1.5)
    try:
        before = dict(engine.stats)
        big = httpx.post(f"{server.url}/v1/embeddings", json={"input": [LONG] * 2048}, timeout=120)
        assert big.status_code == 504, big.text[:300]
        assert big.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 120
        while engine.stats["dropped"] == before["dropped"] and time.monotonic() < deadline:
            time.sleep(0.1)  # dropping happens when the engine forms its next batch
        dropped = engine.stats["dropped"] - before["dropped"]
        computed = engine.stats["items"] - before["items"]
        assert dropped > 0, "the timed-out request kept running in the engine"
        assert computed < 2048, f"{computed} of 2048 inputs were computed after the 504"
        small = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a single text"}, timeout=60)
        assert small.status_code == 200, small.text
    finally:
        server.stop()


def test_a_client_that_hangs_up_has_its_request_dropped_in_the_engine(embedded: Served, bundled_model: Path) -> None:
    """The client of a 2,048 x 256-token request gives up after a second and closes its
    connection (the server's own timeout is a minute away): the request is cancelled, the
    engine drops its remaining inputs, the metrics count a 499, and the server keeps answering."""
    import re

    from worker.hosting import registry

    engine = registry.of(embedded.worker_app).engine_for(str(bundled_model), JobKind.embed)
    server = facade(embedded, bundled_model, True, timeout_s=60)
    try:
        before = dict(engine.stats)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/embeddings", json={"input": [LONG] * 2048},
                       timeout=httpx.Timeout(60, read=1.0))
        deadline = time.monotonic() + 120
        while engine.stats["dropped"] == before["dropped"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.stats["dropped"] > before["dropped"], "the abandoned request kept running in the engine"
        assert engine.stats["items"] - before["items"] < 2048
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert re.search(r'^embedfleet_http_requests_total\{[^}]*status="499"[^}]*\} 1\.0$', metrics, re.M), \
            [line for line in metrics.splitlines() if "requests_total" in line]
        small = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a single text"}, timeout=60)
        assert small.status_code == 200, small.text
    finally:
        server.stop()


def test_thin_a_client_that_hangs_up_has_its_call_revoked_and_dropped_by_the_worker(
        thin: Served, redis_module: RedisServer, bundled_model: Path) -> None:
    """Thin facade, real Redis, an ``embedfleet worker`` subprocess: the client of a 2,048 x
    256-token call hangs up after a second while the facade would wait five minutes; the facade
    revokes the call and the worker's engine drops the rest, so the answer the worker stores is
    the timeout code, not 2,048 vectors computed for nobody."""
    import json

    import redis

    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings

    server = ServerThread(create_app(Client(broker=redis_module.url),
                                     FacadeSettings(models=[str(bundled_model)], timeout_s=300,
                                                    refresh_s=1.0))).start()
    store = redis.Redis.from_url(redis_module.url)
    try:
        wait_ready(server.url)
        seen = set(store.keys("celery-task-meta-*"))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/embeddings", json={"input": [LONG] * 2048},
                       timeout=httpx.Timeout(60, read=1.0))
        def answers() -> list[dict]:
            """New inline answers in the result store (other tasks, e.g. discovery, store theirs too)."""
            found = []
            for key in store.keys("celery-task-meta-*"):
                value = store.get(key) if key not in seen else None
                result = json.loads(value).get("result") if value else None
                if isinstance(result, dict) and result.get("model") == "all-MiniLM-L6-v2":
                    found.append(result)
            return found

        deadline = time.monotonic() + 240
        stored: list[dict] = []
        while not stored and time.monotonic() < deadline:
            stored = answers()
            time.sleep(0.2)
        assert stored, "the worker stored no answer for the abandoned call"
        assert (stored[0].get("error") or {}).get("code") == "timeout", str(stored[0])[:500]
        small = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a single text"}, timeout=60)
        assert small.status_code == 200, small.text
    finally:
        server.stop()
