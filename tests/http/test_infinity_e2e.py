"""infinity's own end-to-end API tests (libs/infinity_emb/tests/end_to_end: test_api_with_dummymodel.py,
test_torch_reranker.py), ported to real HTTP against a running server. Where infinity's answer
differs on purpose it is said: over-long inputs are a 413 here (infinity: 422), a bad top_n a
400 (infinity: 422), a returned document is Cohere's ``{"text": ...}`` object (infinity: the
string itself), and JSON floats are float32's shortest form (equal to base64's as float32)."""

from __future__ import annotations

import asyncio
import base64
import itertools

import httpx
import numpy as np

from tests.http.servers import Served


def test_model_route(embedded: Served) -> None:
    data = httpx.get(f"{embedded.url}/models").json()["data"]
    assert {embedded.embed, embedded.bundled} <= {m["id"] for m in data}
    assert all(isinstance(m.get("stats"), dict) for m in data)
    health = httpx.get(f"{embedded.url}/health")
    assert health.status_code == 200 and "unix" in health.json()


def test_embedding_max_length(single: Served, embedded: Served) -> None:
    too_long = "%_" * 4097 * 15  # infinity's case: 122,910 characters
    response = httpx.post(f"{embedded.url}/embeddings", json={"input": too_long, "model": embedded.bundled})
    assert response.status_code == 413 and response.json()["error"]["param"] == "input[0]"
    fits = httpx.post(f"{single.url}/embeddings", json={"input": "%_" * 4096 * 15, "model": single.bundled})
    assert fits.status_code == 200 and fits.json()["model"] == single.bundled  # --max-chars raised here


def test_encoding_base_64(embedded: Served) -> None:
    body = {"input": "Hello World", "model": embedded.bundled}
    floats = httpx.post(f"{embedded.url}/embeddings", json={**body, "encoding_format": "float"}).json()
    encoded = httpx.post(f"{embedded.url}/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype=np.float32)
    # JSON carries each value's shortest float32 form: equal once read back as float32 (bit for bit)
    np.testing.assert_array_equal(np.array(floats["data"][0]["embedding"], dtype=np.float32), decoded)


def test_embedding_and_matryoshka(embedded: Served) -> None:
    for inputs in (["This is a test sentence."], ["This is a test sentence.", "This is another test sentence."]):
        for dimensions, size in ((None, 384), (10, 10)):
            body = {"input": inputs, "model": embedded.bundled, **({"dimensions": dimensions} if dimensions else {})}
            response = httpx.post(f"{embedded.url}/embeddings", json=body)
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert len(data) == len(inputs) and all(len(d["embedding"]) == size for d in data)


def test_reranker_top_n(embedded: Served) -> None:
    from worker.hosting import registry as runtime

    query = "Where is the Eiffel Tower located?"
    documents = ["The Eiffel Tower is located in the United States.", "The Eiffel Tower is located in Paris, France",
                 "The Eiffel Tower is located in the United Kingdom."]
    scores = runtime.of(embedded.worker_app).engine_for(embedded.rerank).run([(query, d) for d in documents], timeout=60).values.reshape(-1)
    best = documents[int(np.argmax(scores))]  # random weights: the engine says which one is first

    async def case(client: httpx.AsyncClient, docs: tuple[str, ...], return_docs: bool, top_n: int) -> None:
        body = {"model": embedded.rerank, "query": query, "documents": list(docs), "top_n": top_n,
                "return_documents": return_docs}
        response = await client.post("/rerank", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == min(top_n, len(docs)) and results[0]["index"] == docs.index(best)
        if return_docs:
            assert results[0]["document"] == {"text": best}

    async def all_cases() -> None:
        async with httpx.AsyncClient(base_url=embedded.url, timeout=60) as client:
            await asyncio.gather(*(case(client, docs, r, n) for docs in itertools.permutations(documents)
                                   for n in (1, 2, 8000) for r in (True, False)))

    asyncio.run(all_cases())


def test_reranker_invalid_top_n_and_cant_embed_or_classify(embedded: Served) -> None:
    base = {"model": embedded.rerank, "query": "q", "documents": ["a", "b"]}
    for top_n in (-1, 0):
        assert httpx.post(f"{embedded.url}/rerank", json={**base, "top_n": top_n}).status_code == 400
    for path in ("/embeddings", "/classify"):
        response = httpx.post(f"{embedded.url}{path}", json={"model": embedded.rerank, "input": ["a"]})
        assert response.status_code == 400 and "is a rerank model" in response.json()["error"]["message"]
