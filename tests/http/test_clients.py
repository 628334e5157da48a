"""Real clients against a running server, embedded and thin: openai, LangChain, 64 concurrent."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.http.servers import Served, reference

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.",
         "A short one", "Ein Satz auf Deutsch mit Umlauten: äöü ß."]


@pytest.fixture(params=["embedded", "thin"])
def served(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(request.param)


def test_openai_client_float_and_base64(served: Served, reference_engine: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    expected = reference(reference_engine, TEXTS)
    floats = client.embeddings.create(input=TEXTS, model=served.bundled, encoding_format="float")
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert floats.usage.prompt_tokens == sum(len(reference_engine.tokenizer.encode([t])[0].ids) for t in TEXTS)
    # the openai client asks for base64 by default and decodes it itself
    default = client.embeddings.create(input=TEXTS, model=served.bundled)
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), expected, atol=1e-5)
    raw = httpx.post(f"{served.url}/v1/embeddings", json={"input": TEXTS[0], "model": served.bundled,
                                                          "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, expected[0], atol=1e-5)


def test_dimensions_truncate_and_renormalize(served: Served, reference_engine: Any) -> None:
    body = {"input": TEXTS[:2], "model": served.bundled, "dimensions": 64}
    data = httpx.post(f"{served.url}/v1/embeddings", json=body).json()["data"]
    got = np.array([d["embedding"] for d in data])
    full = reference(reference_engine, TEXTS[:2])[:, :64]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


def test_langchain_infinity_embeddings(served: Served, reference_engine: Any) -> None:
    from langchain_community.embeddings import InfinityEmbeddings

    embeddings = InfinityEmbeddings(model=served.bundled, infinity_api_url=served.url)
    docs = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[1])
    expected = reference(reference_engine, TEXTS)
    np.testing.assert_allclose(np.array(docs), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(query), expected[1], atol=1e-5)


def _batches(url: str, model: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf'embedfleet_worker_batches_total{{model="{re.escape(model)}"}} ([0-9.e+]+)', text)
    assert match, text
    return float(match.group(1))


def test_64_concurrent_clients_get_direct_engine_vectors(served: Served, reference_engine: Any) -> None:
    texts = [f"request {i}: " + " ".join(["word"] * (i % 17 + 1)) + f" number {i * 7}" for i in range(64)]
    expected = reference(reference_engine, texts)
    before = _batches(served.url, served.bundled)

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        response = await client.post("/v1/embeddings", json={"input": texts[i], "model": served.bundled})
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["embedding"]

    async def all_at_once() -> list[list[float]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = np.array(asyncio.run(all_at_once()), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # requests shared batches in the worker: fewer engine batches than requests. The figure comes
    # from the workers' answers, refreshed every second: wait for an answer given after the calls.
    time.sleep(2.5)
    ran = _batches(served.url, served.bundled) - before
    assert 1 <= ran < 64, ran


def test_models_and_health(served: Served) -> None:
    models = httpx.get(f"{served.url}/v1/models").json()
    by_id = {m["id"]: m for m in models["data"]}
    card = by_id[served.bundled]
    assert (card["kind"], card["dimensions"], card["max_length"]) == ("embed", 384, 256)
    assert card["backend"] == "torch" and card["device"] == "cpu" and card["dtype"]
    assert by_id[served.embed]["dimensions"] == 32
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    unversioned = httpx.get(f"{served.url}/models").json()
    assert {m["id"] for m in unversioned["data"]} == set(by_id)
