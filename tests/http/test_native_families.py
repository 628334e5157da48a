"""The native families behind the HTTP facade (embedded mode, real HTTP): a decoder reranker on
/v1/rerank and a JinaBERT v2 model on /v1/embeddings answer what their engines compute."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from tests.families import save_jina, save_qwen3_causal_lm
from tests.fixtures_extra import make_engine, sample_texts
from tests.http.servers import ServerThread

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def facade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    import worker.commands.serve as serve
    from producer.http.settings import FacadeSettings
    from worker.hosting.host import WorkerSpec

    root = tmp_path_factory.mktemp("native")
    reranker = save_qwen3_causal_lm(root / "tiny-qwen3-reranker", sample_texts(300, step=5), max_length=256)
    jina = save_jina(root / "tiny-jina-v2")
    models = [str(reranker), str(jina)]
    spec = WorkerSpec(models=models, device="cpu", concurrency=8)
    app, worker = serve.build(None, None, models, FacadeSettings(timeout_s=60, refresh_s=1.0), spec)
    server = ServerThread(app).start()
    yield server.url, reranker, jina
    server.stop()
    if worker is not None and worker.alive():
        worker.stop()


def test_rerank_route_scores_with_the_decoder_reranker(facade: tuple[str, Path, Path]) -> None:
    url, reranker, _ = facade
    docs = sample_texts(6, step=83)
    engine = make_engine(reranker)
    try:
        expected = engine.run([("how to open a file", d) for d in docs], timeout=60).values.reshape(len(docs))
    finally:
        engine.stop()
    response = httpx.post(f"{url}/v1/rerank", json={"model": "tiny-qwen3-reranker", "query": "how to open a file",
                                                      "documents": docs}, timeout=60)
    assert response.status_code == 200, response.text
    got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, rtol=1e-5, atol=1e-6)


def test_embeddings_route_with_jina_v2(facade: tuple[str, Path, Path]) -> None:
    url, _, jina = facade
    texts = sample_texts(4, step=211)
    engine = make_engine(jina)
    try:
        expected = engine.run(texts, timeout=60).values
    finally:
        engine.stop()
    response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-jina-v2", "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
