"""Rerank (Cohere/Jina shape) and classify (infinity shape) against the engine's own answers."""

from __future__ import annotations

import httpx
import numpy as np

from tests.http.servers import Served

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel tower is in Paris.",
        "Rust is a programming language."]


def _engine(served: Served, model: str):  # type: ignore[no-untyped-def]
    from worker.hosting import registry as runtime

    return runtime.of(served.worker_app).engine_for(model)


def test_rerank_sorted_top_n_and_documents(embedded: Served) -> None:
    query = "Where is the Eiffel tower?"
    expected = _engine(embedded, embedded.rerank).run([(query, d) for d in DOCS], timeout=60).values.reshape(len(DOCS))
    body = {"model": embedded.rerank, "query": query, "documents": DOCS, "top_n": 3, "return_documents": True}
    response = httpx.post(f"{embedded.url}/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    order = list(np.argsort(-expected, kind="stable")[:3])
    assert [r["index"] for r in results] == order
    np.testing.assert_allclose([r["relevance_score"] for r in results], expected[order], atol=1e-5)
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in order]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # unversioned route, Cohere document objects, no documents echoed by default
    plain = httpx.post(f"{embedded.url}/rerank", json={"model": embedded.rerank, "query": query,
                                                       "documents": [{"text": d} for d in DOCS]}).json()
    assert len(plain["results"]) == len(DOCS) and "document" not in plain["results"][0]
    assert plain["usage"]["total_tokens"] > 0


def test_rerank_bad_inputs(embedded: Served) -> None:
    base = {"model": embedded.rerank, "query": "q"}
    for body, status in (({**base, "documents": []}, 400), ({**base, "documents": ["a"], "top_n": 0}, 400),
                         ({**base, "documents": [1]}, 400), ({**base, "query": "", "documents": ["a"]}, 400),
                         ({"model": embedded.embed, "query": "q", "documents": ["a"]}, 400)):
        response = httpx.post(f"{embedded.url}/v1/rerank", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["message"]


def test_classify_labels_and_scores(embedded: Served) -> None:
    texts = ["I love it", "I hate it"]
    expected = _engine(embedded, embedded.classify).run(texts, timeout=60).values
    response = httpx.post(f"{embedded.url}/v1/classify", json={"model": embedded.classify, "input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    labels = ["negative", "neutral", "positive"]
    for row, probs in zip(data, expected):
        assert {item["label"] for item in row} == set(labels)
        assert [item["score"] for item in row] == sorted((item["score"] for item in row), reverse=True)
        got = {item["label"]: item["score"] for item in row}
        np.testing.assert_allclose([got[label] for label in labels], probs, atol=1e-5)
    single = httpx.post(f"{embedded.url}/classify", json={"input": "fine"}).json()  # the one classify model
    assert len(single["data"]) == 1 and single["model"] == embedded.classify


def test_classify_raw_scores_are_the_engine_logits(embedded: Served) -> None:
    from producer.jobs import Options

    expected = _engine(embedded, embedded.classify).run(["so so"], Options(raw_scores=True), timeout=60).values[0]
    body = {"model": embedded.classify, "input": ["so so"], "raw_scores": True}
    row = httpx.post(f"{embedded.url}/v1/classify", json=body).json()["data"][0]
    got = {item["label"]: item["score"] for item in row}
    np.testing.assert_allclose([got[label] for label in ("negative", "neutral", "positive")], expected, atol=1e-5)
    assert abs(sum(got.values()) - 1.0) > 1e-3  # logits, not probabilities
