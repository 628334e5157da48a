"""The native families behind the HTTP facade (embedded mode, real HTTP): a decoder reranker on
/v1/rerank and a JinaBERT v2 model on /v1/embeddings answer what their engines compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from tests.families import save_jina, save_qwen3_causal_lm
from tests.fixtures_extra import make_engine, sample_texts
from tests.conftest import free_port
from tests.http.servers import ROOT, wait_ready

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def facade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """``embedfleet serve`` (embedded mode) in its own process: it hosts its own engines, so stopping
    it leaves this process's hosted engines (the other facade tests') alone."""
    root = tmp_path_factory.mktemp("native")
    reranker = save_qwen3_causal_lm(root / "tiny-qwen3-reranker", sample_texts(300, step=5), max_length=256)
    jina = save_jina(root / "tiny-jina-v2")
    port = free_port()
    log = root / "serve.log"
    args = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--model", str(reranker),
            "--model", str(jina), "--device", "cpu", "--port", str(port), "--concurrency", "8"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc, log=log)
        yield url, reranker, jina
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
