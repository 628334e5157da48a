"""The interactive path on a GPU: a thin facade of two processes in front of one CUDA worker
(bf16) on a real Redis; hundreds of concurrent single-text and 32-text requests, each answered
once, with its own rows, close to the CPU fp32 engine's. Skipped without CUDA."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from tests.conftest import RedisServer, free_port  # noqa: E402
from tests.http.servers import ROOT, reference, wait_ready  # noqa: E402


@pytest.fixture(scope="module")
def gpu_fleet(redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("gpu-facade")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", EMBEDFLEET_STORAGE_ROOTS=str(logs))
    entry = [sys.executable, "-c", "from worker.cli import main; main()"]
    worker = subprocess.Popen([*entry, "worker", "--broker", redis_module.url, "--device", "cuda", "--dtype",
                               "bfloat16", "--concurrency", "64"], cwd=ROOT, env=env,
                              stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT)
    port = free_port()
    facade = subprocess.Popen([*entry, "serve", "--broker", redis_module.url, "--port", str(port), "--processes", "2"],
                              cwd=ROOT, env=env, stdout=(logs / "serve.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=300, proc=worker, log=logs / "worker.log")
        yield url
    finally:
        for proc in (facade, worker):
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_concurrent_calls_on_the_gpu_are_each_answered_once_with_their_rows(gpu_fleet: str,
                                                                           reference_engine: Any) -> None:
    texts = [f"query {i} about {'gpu embedding servers ' * (1 + i % 7)}" for i in range(256)]

    async def fire() -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=gpu_fleet, timeout=120, limits=limits) as client:
            singles = asyncio.gather(*(client.post("/v1/embeddings", json={"input": t}) for t in texts))
            batches = asyncio.gather(*(client.post("/v1/embeddings", json={"input": texts[k:k + 32]})
                                       for k in range(0, len(texts), 32)))
            return await singles, await batches

    singles, batches = asyncio.run(fire())
    assert [r.status_code for r in singles + batches] == [200] * (len(singles) + len(batches))
    want = reference(reference_engine, texts)
    got = np.array([r.json()["data"][0]["embedding"] for r in singles])
    got_batched = np.array([row["embedding"] for r in batches for row in r.json()["data"]])
    for rows in (got, got_batched):
        cosine = (rows * want).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.99, cosine.min()  # bf16 on the GPU against the CPU's fp32
