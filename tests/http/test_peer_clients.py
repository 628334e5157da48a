"""Other peers' client libraries against a running server, unchanged but for their base URL:
LangChain's OpenAIEmbeddings, llama-index's OpenAIEmbedding, voyageai's Client (its embed and
its rerank) and huggingface_hub's InferenceClient (TEI's root route). Each gets the vectors the
engine gives directly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.http.servers import Served, reference

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.", "A short one"]


def test_langchain_openai_embeddings(single: Served, reference_engine: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send texts, not tiktoken ids of OpenAI's own vocabulary
    # (LangChain's documented setting for OpenAI-compatible servers; tiktoken ids mean nothing here)
    embeddings = OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{single.url}/v1", api_key="unused",
                                  check_embedding_ctx_length=False)
    expected = reference(reference_engine, TEXTS)
    np.testing.assert_allclose(np.array(embeddings.embed_documents(TEXTS)), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(embeddings.embed_query(TEXTS[0])), expected[0], atol=1e-5)


def test_llama_index_openai_embedding(single: Served, reference_engine: Any) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    embedding = OpenAIEmbedding(api_base=f"{single.url}/v1", api_key="unused")  # its default model name
    expected = reference(reference_engine, TEXTS)
    np.testing.assert_allclose(np.array(embedding.get_text_embedding_batch(TEXTS)), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(embedding.get_query_embedding(TEXTS[1])), expected[1], atol=1e-5)


def test_voyageai_client_embed_and_rerank(single: Served, reference_engine: Any) -> None:
    import voyageai
    from worker.hosting import registry as runtime

    client = voyageai.Client(api_key="unused", base_url=f"{single.url}/v1", max_retries=0)
    expected = reference(reference_engine, TEXTS)
    result = client.embed(TEXTS, model="voyage-3", input_type="document")
    np.testing.assert_allclose(np.array(result.embeddings), expected, atol=1e-5)
    assert result.total_tokens == sum(len(reference_engine.tokenizer.encode([t])[0].ids) for t in TEXTS)
    quantized = client.embed(TEXTS, model="voyage-3", output_dtype="int8").embeddings
    peak = np.abs(expected).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(np.array(quantized), np.rint(expected * 127.0 / peak).astype(np.int8))
    ranked = client.rerank("q", TEXTS, model="rerank-2", top_k=2)
    scores = runtime.of(single.worker_app).engine_for(single.rerank).run([("q", t) for t in TEXTS], timeout=60).values.reshape(-1)
    assert [r.index for r in ranked.results] == list(np.argsort(-scores, kind="stable")[:2])
    assert [r.document for r in ranked.results] == [TEXTS[i] for i in np.argsort(-scores, kind="stable")[:2]]
    assert ranked.total_tokens > 0


def test_huggingface_hub_inference_client(embed_only: Served, single: Served, reference_engine: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``InferenceClient(model=URL)`` posts TEI-style bodies to ``/`` (TEI's root route)."""
    import httpx
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # it refuses even a local URL offline

    expected = reference(reference_engine, TEXTS)
    vectors = InferenceClient(model=embed_only.url).feature_extraction(TEXTS[0], normalize=True)
    np.testing.assert_allclose(np.array(vectors).reshape(-1), expected[0], atol=1e-5)
    several = httpx.post(f"{single.url}/", json={"inputs": TEXTS[0]})  # several kinds served: name one
    assert several.status_code == 400 and "several kinds" in several.json()["error"]["message"]
    body = {"inputs": TEXTS[:2], "model": single.bundled, "parameters": {"normalize": True}}
    np.testing.assert_allclose(np.array(httpx.post(f"{single.url}/", json=body).json()), expected[:2], atol=1e-5)
    ranks = httpx.post(f"{single.url}/", json={"model": single.rerank, "query": "q", "texts": TEXTS}).json()
    assert sorted(r["index"] for r in ranks) == [0, 1, 2]
