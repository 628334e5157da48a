"""Sparse and multi-vector outputs, and CLIP's image inputs, over a real fleet: a real Redis, an ``embedfleet worker``
subprocess hosting the tiny bge-m3 (and a dense-only model), the thin facade over real HTTP, and
``Client.embed(outputs=...)`` on the same broker. Answers are compared with the engine's outputs
(themselves checked against FlagEmbedding's definition in tests/models/test_bge_m3.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from producer.jobs import Options

from tests.conftest import RedisServer
from tests.families import image_bytes, save_image_text, tiny_bge_m3_model, tiny_splade_model  # noqa: F401
from tests.fixtures_extra import make_engine, sample_texts
from tests.http.servers import ServerThread, WorkerProcess, wait_ready

pytestmark = pytest.mark.timeout(300)

TEXTS = sample_texts(5, step=97)
ALL = ["dense", "sparse", "multivector"]


@pytest.fixture(scope="module")
def expected(tiny_bge_m3_model: Path) -> Any:
    engine = make_engine(tiny_bge_m3_model)
    try:
        return engine.run(TEXTS, Options(outputs=ALL))
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_image_text(tmp_path_factory.mktemp("vision") / "tiny-clip", "clip")


@pytest.fixture(scope="module")
def fleet(tiny_bge_m3_model: Path, tiny_embed_model: Path, tiny_splade_model: Path, clip_model: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings

    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = WorkerProcess(redis.url, [str(tiny_bge_m3_model), str(tiny_embed_model), str(tiny_splade_model),
                                        str(clip_model)], log).start()
    settings = FacadeSettings(timeout_s=60, refresh_s=1.0)
    server = ServerThread(create_app(Client(broker=redis.url), settings)).start()
    try:
        wait_ready(server.url, proc=worker.proc, log=worker.log)
        yield server.url, redis.url
    finally:
        server.stop()
        worker.stop()
        redis.stop()


def test_tei_embed_sparse(fleet: tuple[str, str], expected: Any) -> None:
    url, _ = fleet
    response = httpx.post(f"{url}/embed_sparse", json={"model": "tiny-bge-m3", "inputs": TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    for row, want in zip(response.json(), expected.sparse):
        assert [item["index"] for item in row] == want.indices.tolist()
        np.testing.assert_allclose([item["value"] for item in row], want.values, atol=2e-5)
    single = httpx.post(f"{url}/embed_sparse", json={"model": "tiny-bge-m3", "inputs": TEXTS[0]}, timeout=60)
    assert [item["index"] for item in single.json()[0]] == expected.sparse[0].indices.tolist()


def test_multivector_on_v1_embeddings_as_floats_and_base64(fleet: tuple[str, str], expected: Any) -> None:
    url, _ = fleet
    body = {"model": "tiny-bge-m3", "input": TEXTS, "output": "multivector"}
    floats = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert floats.status_code == 200, floats.text
    encoded = httpx.post(f"{url}/v1/embeddings", json={**body, "encoding_format": "base64"}, timeout=60)
    for item, b64, want in zip(floats.json()["data"], encoded.json()["data"], expected.multivector):
        np.testing.assert_allclose(np.array(item["embedding"]), want, atol=2e-5)
        raw = np.frombuffer(base64.b64decode(b64["embedding"]), dtype="<f4").reshape(-1, 24)
        np.testing.assert_allclose(raw, want, atol=2e-5)
    dense = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-bge-m3", "input": TEXTS}, timeout=60)
    np.testing.assert_allclose(np.array([d["embedding"] for d in dense.json()["data"]]), expected.values, atol=2e-5)


def test_outputs_a_model_lacks_are_400s_naming_them(fleet: tuple[str, str]) -> None:
    url, _ = fleet
    sparse = httpx.post(f"{url}/embed_sparse", json={"model": "tiny-bert", "inputs": "x"}, timeout=60)
    assert sparse.status_code == 400 and "does not give sparse" in sparse.text and "gives dense" in sparse.text
    multi = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-bert", "input": "x", "output": "multivector"},
                       timeout=60)
    assert multi.status_code == 400 and "gives dense" in multi.text
    quantized = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-bge-m3", "input": "x",
                                                          "output": "multivector", "encoding_format": "int8"},
                           timeout=60)
    assert quantized.status_code == 400 and "not quantized" in quantized.text
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
    assert models["tiny-bge-m3"]["outputs"] == ALL and models["tiny-bert"]["outputs"] == ["dense"]


def test_client_embed_with_outputs(fleet: tuple[str, str], expected: Any) -> None:
    from producer.client import Client

    _, broker = fleet
    client = Client(broker=broker, timeout=60)
    got = client.embed(TEXTS, model="tiny-bge-m3", outputs=ALL)
    np.testing.assert_allclose(got.dense, expected.values, atol=2e-5)
    for (indices, values), want in zip(got.sparse, expected.sparse):
        assert indices.tolist() == want.indices.tolist()
        np.testing.assert_allclose(values, want.values, atol=2e-5)
    for rows, want in zip(got.multivector, expected.multivector):
        np.testing.assert_allclose(rows, want, atol=2e-5)
    matrix = got.sparse.to_scipy()
    assert matrix.shape == (len(TEXTS), 30522) and matrix.nnz == len(got.sparse.values)
    sparse_only = client.embed(TEXTS[:2], model="tiny-bge-m3", outputs=["sparse"])
    assert sparse_only.dense is None and sparse_only.multivector is None
    assert isinstance(client.embed(TEXTS[:2], model="tiny-bge-m3"), np.ndarray)  # no outputs named: dense, as ever


def test_splade_on_embed_sparse_and_refused_where_dense_is_needed(fleet: tuple[str, str],
                                                                   tiny_splade_model: Path) -> None:
    url, _ = fleet
    engine = make_engine(tiny_splade_model)
    try:
        want = engine.run(TEXTS[:3], Options(prompt_name="query")).sparse
    finally:
        engine.stop()
    response = httpx.post(f"{url}/embed_sparse", json={"model": "tiny-splade", "inputs": TEXTS[:3],
                                                        "prompt_name": "query"}, timeout=60)
    assert response.status_code == 200, response.text
    for row, expected_row in zip(response.json(), want):
        assert [item["index"] for item in row] == expected_row.indices.tolist()
        np.testing.assert_allclose([item["value"] for item in row], expected_row.values, rtol=1e-5, atol=1e-5)
    for route, body in (("/v1/embeddings", {"input": "x"}), ("/embed", {"inputs": "x"})):
        refused = httpx.post(f"{url}{route}", json={"model": "tiny-splade", **body}, timeout=60)
        assert refused.status_code == 400 and "sparse" in refused.text, (route, refused.text)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server holding two images (an http(s) URL input is fetched by the worker)."""
    import functools
    import http.server
    import threading

    root = tmp_path_factory.mktemp("images")
    (root / "a.png").write_bytes(image_bytes(40, 30, "PNG", 11))
    (root / "b.jpg").write_bytes(image_bytes(50, 50, "JPEG", 12))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_clip_images_over_http_and_the_client(fleet: tuple[str, str], clip_model: Path, image_server: str,
                                              tmp_path: Path) -> None:
    from producer.client import Client

    url, broker = fleet
    png, jpg = image_bytes(40, 30, "PNG", 11), image_bytes(50, 50, "JPEG", 12)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    engine = make_engine(clip_model)
    try:
        want = engine.run([{"image": uri}, {"image": "data:image/jpeg;base64," + base64.b64encode(jpg).decode()},
                           "a photo of a cat"]).values
    finally:
        engine.stop()
    infinity = httpx.post(f"{url}/embeddings_image", json={"model": "tiny-clip", "input": [
        f"{image_server}/a.png", f"{image_server}/b.jpg"]}, timeout=60)
    assert infinity.status_code == 200, infinity.text
    np.testing.assert_allclose([d["embedding"] for d in infinity.json()["data"]], want[:2], atol=2e-5)
    mixed = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-clip", "input": [uri, "a photo of a cat"]},
                       timeout=60)
    assert mixed.status_code == 200, mixed.text
    np.testing.assert_allclose([d["embedding"] for d in mixed.json()["data"]], want[[0, 2]], atol=2e-5)
    (tmp_path / "b.jpg").write_bytes(jpg)
    got = Client(broker=broker, timeout=60).embed_images([png, tmp_path / "b.jpg"], model="tiny-clip")
    np.testing.assert_allclose(got, want[:2], atol=2e-5)
    missing = httpx.post(f"{url}/embeddings_image", json={"model": "tiny-clip", "input": f"{image_server}/nope.png"},
                         timeout=60)
    assert missing.status_code == 400 and "could not download the image" in missing.text, missing.text
    text_only = httpx.post(f"{url}/embeddings_image", json={"model": "tiny-bert", "input": uri}, timeout=60)
    assert text_only.status_code == 400 and "embeds text only" in text_only.text
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
    assert "image_embed" in models["tiny-clip"]["capabilities"]


def test_cohere_v2_embed_images_and_inputs_with_the_cohere_client(fleet: tuple[str, str], clip_model: Path,
                                                                   image_server: str) -> None:
    """Cohere's ``images`` (data URIs) and ``inputs`` (text or image_url content) through the real
    cohere.ClientV2 on the facade, against the engine's own vectors of the same images and text."""
    import cohere

    url, _ = fleet
    png = "data:image/png;base64," + base64.b64encode(image_bytes(40, 30, "PNG", 11)).decode()
    jpg = "data:image/jpeg;base64," + base64.b64encode(image_bytes(50, 50, "JPEG", 12)).decode()
    engine = make_engine(clip_model)
    try:
        want = engine.run([{"image": png}, {"image": jpg}, "a photo of a cat"]).values
    finally:
        engine.stop()
    client = cohere.ClientV2(api_key="unused", base_url=url)
    images = client.embed(model="tiny-clip", input_type="image", embedding_types=["float", "base64"],
                          images=[png, jpg])
    np.testing.assert_allclose(np.array(images.embeddings.float_), want[:2], atol=2e-5)
    decoded = [np.frombuffer(base64.b64decode(b), "<f4") for b in images.embeddings.base64]
    np.testing.assert_allclose(np.array(decoded), want[:2], atol=2e-5)
    assert images.texts == [] and images.meta.billed_units.images == 2

    def image(ref: str) -> cohere.EmbedInput:
        return cohere.EmbedInput(content=[cohere.ImageUrlEmbedContent(image_url=cohere.EmbedImageUrl(url=ref))])

    mixed = client.embed(model="tiny-clip", input_type="search_document", embedding_types=["float"], inputs=[
        image(f"{image_server}/b.jpg"), cohere.EmbedInput(content=[cohere.TextEmbedContent(text="a photo of a cat")]),
        image(png)])
    np.testing.assert_allclose(np.array(mixed.embeddings.float_), want[[1, 2, 0]], atol=2e-5)
    assert mixed.texts == ["a photo of a cat"] and mixed.meta.billed_units.images == 2

    fused = {"content": [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {"url": png}}]}
    broken = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    for body, param, words in (
            ({"inputs": [fused]}, "inputs[0].content", "2 components"),
            ({"images": [f"{image_server}/a.png"]}, "images[0]", "data URI"),
            ({"texts": ["a"], "images": [png]}, "images", "exactly one of texts, images or inputs"),
            ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
             "inputs[0].content[0].image_url.url", "http(s) URL or a data: URI"),
            ({"images": [png, broken]}, "images[1]", "image")):
        reply = httpx.post(f"{url}/v2/embed", json={"model": "tiny-clip", "input_type": "image", **body}, timeout=60)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and words in error["message"], (param, error)
    text_model = httpx.post(f"{url}/v2/embed", json={"model": "tiny-bert", "inputs": [
        {"content": [{"type": "image_url", "image_url": {"url": png}}]}]}, timeout=60)
    assert text_model.status_code == 400 and "embeds text only" in text_model.text, text_model.text
    texts_as_inputs = client.embed(model="tiny-bert", input_type="search_query", embedding_types=["float"],
                                   inputs=[cohere.EmbedInput(content=[cohere.TextEmbedContent(text="plain text")])])
    assert texts_as_inputs.texts == ["plain text"] and len(texts_as_inputs.embeddings.float_) == 1
