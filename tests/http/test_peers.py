"""Peers' request and response shapes over real HTTP: infinity, TEI's native routes, Cohere v2,
OpenAI's encodings; model names as peers resolve them; JSON bodies without a JSON content type.

The field lists below are copied from the peers' published schemas (infinity's
fastapi_schemas/pymodels.py, TEI's docs/openapi.json, Cohere's v2 API reference) and checked
against real answers of a running server.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest

from tests.http.servers import Served, reference

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.", "A short one"]

# -- infinity (fastapi_schemas/pymodels.py)
INFINITY_EMBEDDING_RESULT = {"object", "data", "model", "usage", "id", "created"}
INFINITY_EMBEDDING_OBJECT = {"object", "embedding", "index"}
INFINITY_USAGE = {"prompt_tokens", "total_tokens"}
INFINITY_RERANK_RESULT = {"object", "results", "model", "usage", "id", "created"}
INFINITY_CLASSIFY_RESULT = {"object", "data", "model", "usage", "id", "created"}
INFINITY_MODEL_INFO = {"id", "stats", "object", "owned_by", "created", "backend", "capabilities"}

# -- TEI (docs/openapi.json components.schemas)
TEI_INFO_REQUIRED = {"model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length",
                     "max_batch_tokens", "max_client_batch_size", "auto_truncate", "tokenization_workers", "version"}
TEI_INFO_OPTIONAL = {"docker_label", "max_batch_requests", "model_sha", "sha"}
TEI_PREDICTION = {"score", "label"}
TEI_RANK_REQUIRED = {"index", "score"}

# -- Cohere v2 (EmbedByTypeResponse, V2RerankResponse)
COHERE_EMBED_RESPONSE = {"id", "embeddings", "texts", "meta", "response_type"}
COHERE_EMBEDDING_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
COHERE_RERANK_RESPONSE = {"id", "results", "meta"}
COHERE_RERANK_RESULT = {"index", "relevance_score"}


# ---------------------------------------------------------------------------- the numpy definitions
def np_int8(v: np.ndarray) -> np.ndarray:
    """Per vector: the largest magnitude maps to 127, rounded to nearest."""
    return np.stack([np.rint(row * (127.0 / np.abs(row).max())) for row in v]).astype(np.int8)


def np_uint8(v: np.ndarray) -> np.ndarray:
    return (np_int8(v).astype(np.int16) + 128).astype(np.uint8)


def np_ubinary(v: np.ndarray) -> np.ndarray:
    """Bit i of a vector is 1 where v[i] > 0; bytes hold bits 8 at a time, the first one in the MSB."""
    bits = (v > 0).astype(np.uint8)
    padded = np.zeros((len(v), -(-v.shape[1] // 8) * 8), np.uint8)
    padded[:, : v.shape[1]] = bits
    weights = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.uint8)
    return (padded.reshape(len(v), -1, 8) * weights).sum(axis=2).astype(np.uint8)


def np_binary(v: np.ndarray) -> np.ndarray:
    return (np_ubinary(v).astype(np.int16) - 128).astype(np.int8)


NUMPY = {"int8": np_int8, "uint8": np_uint8, "binary": np_binary, "ubinary": np_ubinary}


def test_quantized_encodings_follow_the_numpy_definitions() -> None:
    from producer.http import encodings

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((7, 37)).astype(np.float32)  # 37: not a multiple of 8
    vectors[3, 5] = 0.0
    for kind, definition in NUMPY.items():
        got = encodings.as_type(vectors, kind)
        np.testing.assert_array_equal(got, definition(vectors), err_msg=kind)
        assert got.dtype == definition(vectors).dtype
    assert encodings.as_type(vectors, "ubinary").shape == (7, 5)
    assert np.abs(encodings.as_type(vectors, "int8")).max(axis=1).tolist() == [127] * 7
    assert encodings.as_type(np.zeros((1, 4), np.float32), "int8").tolist() == [[0, 0, 0, 0]]


# ---------------------------------------------------------------------------- model names
def test_any_model_name_resolves_when_one_model_of_the_kind_is_served(single: Served) -> None:
    body = {"input": ["hello", "world"], "model": "default/not-specified", "user": "string"}  # infinity's seed
    response = httpx.post(f"{single.url}/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == single.bundled  # the model that answered
    for path, payload in (("/v1/rerank", {"model": "whatever", "query": "q", "documents": ["a", "b"]}),
                          ("/v1/classify", {"model": "default", "input": ["a"]})):
        answer = httpx.post(f"{single.url}{path}", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] in (single.rerank, single.classify)


def test_unknown_name_among_several_is_a_404_listing_them(embedded: Served) -> None:
    response = httpx.post(f"{embedded.url}/v1/embeddings", json={"input": "a", "model": "default"}, timeout=60)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert embedded.embed in message and embedded.bundled in message
    wrong = httpx.post(f"{embedded.url}/v1/embeddings", json={"input": "a", "model": embedded.rerank}, timeout=60)
    assert wrong.status_code == 400 and "is a rerank model" in wrong.json()["error"]["message"]
    wrong = httpx.post(f"{embedded.url}/v1/rerank", json={"query": "q", "documents": ["a"], "model": embedded.embed})
    assert "is an embed model" in wrong.json()["error"]["message"]


def test_langchain_infinity_embeddings_with_a_placeholder_name(single: Served, reference_engine: Any) -> None:
    from langchain_community.embeddings import InfinityEmbeddings

    embeddings = InfinityEmbeddings(model="default", infinity_api_url=single.url)
    np.testing.assert_allclose(np.array(embeddings.embed_documents(TEXTS)), reference(reference_engine, TEXTS),
                               atol=1e-5)


# ---------------------------------------------------------------------------- infinity's fields
def test_responses_carry_infinitys_fields(single: Served) -> None:
    embedded_ = httpx.post(f"{single.url}/embeddings", json={"input": TEXTS}).json()
    assert INFINITY_EMBEDDING_RESULT <= set(embedded_)
    assert all(INFINITY_EMBEDDING_OBJECT <= set(item) for item in embedded_["data"])
    assert INFINITY_USAGE <= set(embedded_["usage"])
    assert isinstance(embedded_["id"], str) and embedded_["id"] and isinstance(embedded_["created"], int)
    reranked = httpx.post(f"{single.url}/rerank", json={"query": "q", "documents": TEXTS}).json()
    assert INFINITY_RERANK_RESULT <= set(reranked)
    classified = httpx.post(f"{single.url}/classify", json={"input": TEXTS}).json()
    assert INFINITY_CLASSIFY_RESULT <= set(classified)
    assert len({embedded_["id"], reranked["id"], classified["id"]}) == 3
    cards = httpx.get(f"{single.url}/models").json()["data"]
    for card in cards:
        assert INFINITY_MODEL_INFO <= set(card), card
        assert card["capabilities"] == [card["kind"]] and card["backend"] == "torch"
        assert {"batches", "items", "tokens"} <= set(card["stats"]), card["stats"]


# ---------------------------------------------------------------------------- TEI
def test_tei_embed_matches_the_engine(embedded: Served, reference_engine: Any) -> None:
    url = f"{embedded.url}/embed"
    expected = reference(reference_engine, TEXTS)
    many = httpx.post(url, json={"inputs": TEXTS, "model": embedded.bundled}, timeout=60)
    assert many.status_code == 200, many.text
    np.testing.assert_allclose(np.array(many.json()), expected, atol=1e-5)
    one = httpx.post(url, json={"inputs": TEXTS[0], "model": embedded.bundled}).json()
    assert len(one) == 1 and len(one[0]) == 384
    ids = reference_engine.tokenizer.encode([TEXTS[1]])[0].ids.tolist()  # with [CLS]/[SEP], as TEI's tokenize gives
    by_ids = httpx.post(url, json={"inputs": ids, "model": embedded.bundled}).json()
    np.testing.assert_allclose(np.array(by_ids[0]), expected[1], atol=1e-5)
    cut = httpx.post(url, json={"inputs": TEXTS[:1], "model": embedded.bundled, "dimensions": 64}).json()
    full = expected[0, :64]
    np.testing.assert_allclose(np.array(cut[0]), full / np.linalg.norm(full), atol=1e-5)
    left = httpx.post(url, json={"inputs": "a", "model": embedded.bundled, "truncation_direction": "Left"})
    assert left.status_code == 400 and left.json()["error"]["param"] == "truncation_direction"


def test_tei_embed_prompt_name_and_normalize(embedded: Served) -> None:
    from worker.hosting import registry as runtime
    from producer.jobs import Options

    engine = runtime.of(embedded.worker_app).engine_for(embedded.embed)
    expected = engine.run(["what is it?"], Options(prompt_name="query", normalize=False), timeout=60).values
    body = {"inputs": ["what is it?"], "model": embedded.embed, "prompt_name": "query", "normalize": False}
    got = httpx.post(f"{embedded.url}/embed", json=body).json()
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)
    unknown = httpx.post(f"{embedded.url}/embed", json={**body, "prompt_name": "nope"})
    assert unknown.status_code == 400 and "passage, query" in unknown.json()["error"]["message"]


def test_tei_predict_rerank_similarity_info(single: Served, reference_engine: Any) -> None:
    from worker.hosting import registry as runtime

    one = httpx.post(f"{single.url}/predict", json={"inputs": "I love it"}).json()
    assert [set(p) for p in one] == [TEI_PREDICTION] * 3
    assert [p["score"] for p in one] == sorted((p["score"] for p in one), reverse=True)
    batch = httpx.post(f"{single.url}/predict", json={"inputs": [["I love it"], ["I hate it"]]}).json()
    assert len(batch) == 2 and all(len(row) == 3 for row in batch)
    expected = runtime.of(single.worker_app).engine_for(single.classify).run(["I hate it"], timeout=60).values[0]
    got = {p["label"]: p["score"] for p in batch[1]}
    np.testing.assert_allclose([got[k] for k in ("negative", "neutral", "positive")], expected, atol=1e-5)
    pair = httpx.post(f"{single.url}/predict", json={"inputs": ["a", "b"]})
    assert pair.status_code == 400 and "pair" in pair.json()["error"]["message"]

    ranks = httpx.post(f"{single.url}/rerank", json={"query": "q", "texts": TEXTS, "return_text": True}).json()
    assert isinstance(ranks, list) and all(TEI_RANK_REQUIRED | {"text"} == set(r) for r in ranks)
    scores = runtime.of(single.worker_app).engine_for(single.rerank).run([("q", t) for t in TEXTS], timeout=60).values.reshape(-1)
    assert [r["index"] for r in ranks] == list(np.argsort(-scores, kind="stable"))
    np.testing.assert_allclose([r["score"] for r in ranks], np.sort(scores)[::-1], atol=1e-5)
    assert [r["text"] for r in ranks] == [TEXTS[r["index"]] for r in ranks]
    plain = httpx.post(f"{single.url}/rerank", json={"query": "q", "texts": TEXTS}).json()
    assert all(set(r) == TEI_RANK_REQUIRED for r in plain)

    body = {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}
    sims = httpx.post(f"{single.url}/similarity", json=body).json()
    vectors = reference(reference_engine, TEXTS)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, vectors[1:] @ vectors[0], atol=1e-5)

    info = httpx.get(f"{single.url}/info").json()
    assert TEI_INFO_REQUIRED <= set(info) and set(info) - TEI_INFO_REQUIRED <= TEI_INFO_OPTIONAL | {"models"}
    assert info["model_id"] == single.bundled and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["auto_truncate"] is True
    rerank_info = httpx.get(f"{single.url}/info", params={"model": single.rerank}).json()
    assert "reranker" in rerank_info["model_type"]


# ---------------------------------------------------------------------------- OpenAI's encodings
@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_openai_encoding_format_quantized(single: Served, reference_engine: Any, kind: str) -> None:
    expected = reference(reference_engine, TEXTS)
    data = httpx.post(f"{single.url}/v1/embeddings", json={"input": TEXTS, "encoding_format": kind}).json()["data"]
    np.testing.assert_array_equal(np.array([d["embedding"] for d in data]), NUMPY[kind](expected))


def test_base64_of_quantized_and_float16_big_endian(single: Served, reference_engine: Any) -> None:
    expected = reference(reference_engine, TEXTS[:1])
    body = {"input": TEXTS[:1], "encoding_format": "base64", "output_dtype": "int8"}  # Voyage's way
    raw = httpx.post(f"{single.url}/v1/embeddings", json=body).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(raw), np.int8), np_int8(expected)[0])
    body = {"input": TEXTS[:1], "encoding_format": "base64", "embed_dtype": "float16", "endianness": "big"}  # vLLM's
    raw = httpx.post(f"{single.url}/v1/embeddings", json=body).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), ">f2"), expected[0], atol=2e-3)
    both = httpx.post(f"{single.url}/v1/embeddings", json={"input": "a", "encoding_format": "int8",
                                                           "output_dtype": "binary"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "output_dtype"


# ---------------------------------------------------------------------------- Cohere v2
def test_cohere_client_v2_embed_every_type(embedded: Served) -> None:
    import cohere
    from producer.jobs import Options
    from worker.hosting import registry as runtime

    client = cohere.ClientV2(api_key="unused", base_url=embedded.url)
    response = client.embed(model=embedded.embed, texts=TEXTS, input_type="search_query",
                            embedding_types=COHERE_EMBEDDING_TYPES)
    expected = runtime.of(embedded.worker_app).engine_for(embedded.embed).run(TEXTS, Options(prompt_name="query"), timeout=60).values
    np.testing.assert_allclose(np.array(response.embeddings.float_), expected, atol=1e-5)
    for kind, definition in NUMPY.items():
        np.testing.assert_array_equal(np.array(getattr(response.embeddings, kind)), definition(expected))
    decoded = [np.frombuffer(base64.b64decode(b), "<f4") for b in response.embeddings.base64]
    np.testing.assert_allclose(np.array(decoded), expected, atol=1e-6)
    assert response.texts == TEXTS and response.meta.billed_units.input_tokens > 0
    documents = client.embed(model=embedded.embed, texts=TEXTS[:1], input_type="search_document",
                             embedding_types=["float"], output_dimension=16)
    cut = runtime.of(embedded.worker_app).engine_for(embedded.embed).run(TEXTS[:1], Options(prompt_name="passage", dimensions=16),
                                                 timeout=60).values
    np.testing.assert_allclose(np.array(documents.embeddings.float_), cut, atol=1e-5)


def test_cohere_v2_shapes_and_errors(single: Served, embedded: Served) -> None:
    raw = httpx.post(f"{single.url}/v2/embed", json={"model": "embed-v4.0", "texts": TEXTS[:1],
                                                     "input_type": "search_document"}).json()
    assert set(raw) == COHERE_EMBED_RESPONSE and set(raw["embeddings"]) == {"float"}
    assert raw["response_type"] == "embeddings_by_type"
    for body, param in (({"texts": ["a"], "input_type": "nonsense"}, "input_type"),
                        ({"texts": ["a"], "embedding_types": ["int4"]}, "embedding_types"),
                        ({"images": ["data:image/png;base64,AA=="], "input_type": "image"}, "images"),
                        ({"texts": ["a"], "truncate": "START"}, "truncate"),
                        ({"texts": ["a"], "max_tokens": 8}, "max_tokens")):
        response = httpx.post(f"{embedded.url}/v2/embed", json={"model": embedded.embed, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    nonsense = httpx.post(f"{embedded.url}/v2/embed", json={"model": embedded.embed, "texts": ["a"],
                                                            "input_type": "nonsense"}).json()["error"]["message"]
    assert "passage, query" in nonsense and "search_query" in nonsense


def test_cohere_client_v2_rerank(single: Served) -> None:
    import cohere
    from worker.hosting import registry as runtime

    client = cohere.ClientV2(api_key="unused", base_url=single.url)
    response = client.rerank(model="rerank-v3.5", query="q", documents=TEXTS, top_n=2)
    scores = runtime.of(single.worker_app).engine_for(single.rerank).run([("q", t) for t in TEXTS], timeout=60).values.reshape(-1)
    assert [r.index for r in response.results] == list(np.argsort(-scores, kind="stable")[:2])
    np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(scores)[::-1][:2], atol=1e-5)
    raw = httpx.post(f"{single.url}/v2/rerank", json={"query": "q", "documents": TEXTS}).json()
    assert set(raw) == COHERE_RERANK_RESPONSE and all(set(r) == COHERE_RERANK_RESULT for r in raw["results"])


# ---------------------------------------------------------------------------- bodies, limits, schema
def test_json_body_without_a_json_content_type(single: Served) -> None:
    """``curl -d '{...}'`` sends application/x-www-form-urlencoded; the body is read as JSON."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = httpx.post(f"{single.url}/v1/embeddings", content=b'{"input": ["hello"]}', headers=form)
    assert ok.status_code == 200, ok.text
    bare = httpx.post(f"{single.url}/embed", content=b'{"inputs": "hello"}', headers={"content-type": ""})
    assert bare.status_code == 200, bare.text
    junk = httpx.post(f"{single.url}/v1/embeddings", content=b"input=hello", headers=form)
    assert junk.status_code == 400 and "JSON" in junk.json()["error"]["message"]


def test_inputs_over_100000_characters_when_the_limit_is_raised(single: Served) -> None:
    long = "word " * 40_000  # 200,000 characters: cut at the model's maximum, as infinity does
    response = httpx.post(f"{single.url}/v1/embeddings", json={"input": long}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256


def test_openapi_lists_every_route_with_and_without_v1(single: Served) -> None:
    paths = set(httpx.get(f"{single.url}/openapi.json").json()["paths"])
    api = {"/embeddings", "/rerank", "/classify", "/models", "/embed", "/predict", "/similarity", "/info",
           "/tokenize", "/decode", "/embed_all"}
    missing = {p for path in api for p in (path, "/v1" + path) if p not in paths}
    assert not missing and {"/v2/embed", "/v2/rerank", "/health", "/metrics"} <= paths, missing


TEI_SIMPLE_TOKEN = {"id", "text", "special", "start", "stop"}


def test_tei_tokenize_and_decode(single: Served, bundled_model: Any) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_model))
    tokens = httpx.post(f"{single.url}/tokenize", json={"inputs": TEXTS[:2]}).json()
    assert len(tokens) == 2
    for text, row in zip(TEXTS, tokens):
        assert all(set(t) == TEI_SIMPLE_TOKEN for t in row)
        encoding = hf(text, return_offsets_mapping=True)
        assert [t["id"] for t in row] == encoding["input_ids"]
        assert row[0] == {"id": hf.cls_token_id, "text": "[CLS]", "special": True, "start": None, "stop": None}
        for token, (start, stop) in zip(row[1:-1], encoding["offset_mapping"][1:-1]):
            assert (token["start"], token["stop"], token["text"], token["special"]) == (start, stop,
                                                                                        text[start:stop], False)
    bare = httpx.post(f"{single.url}/tokenize", json={"inputs": "hello", "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == hf("hello", add_special_tokens=False)["input_ids"]
    ids = [[t["id"] for t in row] for row in tokens]
    texts = httpx.post(f"{single.url}/decode", json={"ids": ids}).json()
    assert texts == [hf.decode(i, skip_special_tokens=True) for i in ids]
    one = httpx.post(f"{single.url}/decode", json={"ids": ids[0], "skip_special_tokens": False}).json()
    assert one == [hf.decode(ids[0])] and one[0].startswith("[CLS]")
    outside = httpx.post(f"{single.url}/decode", json={"ids": [10**9]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "ids[0]"
    empty = httpx.post(f"{single.url}/decode", json={"ids": []})  # found by schemathesis: was a 500
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "ids"


def test_tei_embed_all_is_the_models_token_states(single: Served, bundled_model: Any) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_model))
    model = AutoModel.from_pretrained(str(bundled_model)).eval()
    states = httpx.post(f"{single.url}/embed_all", json={"inputs": TEXTS[:2]}, timeout=60).json()
    assert len(states) == 2
    for text, got in zip(TEXTS, states):
        with torch.inference_mode():
            expected = model(**hf(text, return_tensors="pt")).last_hidden_state[0].numpy()
        np.testing.assert_allclose(np.array(got), expected, atol=1e-4)
    pooled = np.array(states[0]).mean(axis=0)
    vector = httpx.post(f"{single.url}/embed", json={"inputs": TEXTS[0]}).json()[0]
    np.testing.assert_allclose(pooled / np.linalg.norm(pooled), vector, atol=1e-5)


def test_input_type_and_prompt_name_on_the_openai_route(embedded: Served) -> None:
    """Voyage's input_type (query/document) and prompt_name pick the model's prompts."""
    from producer.jobs import Options
    from worker.hosting import registry as runtime

    engine = runtime.of(embedded.worker_app).engine_for(embedded.embed)
    url = f"{embedded.url}/v1/embeddings"
    for body, prompt in (({"input_type": "query"}, "query"), ({"input_type": "document"}, "passage"),
                         ({"prompt_name": "passage"}, "passage")):
        got = httpx.post(url, json={"input": TEXTS, "model": embedded.embed, **body}).json()["data"]
        expected = engine.run(TEXTS, Options(prompt_name=prompt), timeout=60).values
        np.testing.assert_allclose(np.array([d["embedding"] for d in got]), expected, atol=1e-5)
    plain = engine.run(TEXTS, timeout=60).values
    bundled = httpx.post(url, json={"input": TEXTS, "model": embedded.bundled, "input_type": "query"})
    assert bundled.status_code == 200  # a model without prompts embeds queries as they are
    assert not np.allclose(plain, engine.run(TEXTS, Options(prompt_name="query"), timeout=60).values)


def test_token_level_routes_through_a_fleet_worker(thin: Served, single: Served) -> None:
    """TokensJobs travel over Redis to an ``embedfleet worker`` process like every inline call."""
    for path, body in (("/tokenize", {"inputs": TEXTS[:2]}), ("/decode", {"ids": [[101, 7592, 2088, 102]]}),
                       ("/embed_all", {"inputs": TEXTS[:1]})):
        remote = httpx.post(f"{thin.url}{path}", json={**body, "model": thin.bundled}, timeout=60)
        local = httpx.post(f"{single.url}{path}", json=body, timeout=60)
        assert remote.status_code == 200, remote.text
        if path == "/embed_all":
            np.testing.assert_allclose(np.array(remote.json()), np.array(local.json()), atol=1e-5)
        else:
            assert remote.json() == local.json()
