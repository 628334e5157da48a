"""On a GPU: ``embedfleet worker --device cuda --devices 0,0``, two engine processes sharing one GPU,
drain a short bulk job through a real redis-server (the CUDA paths of the multi-device worker:
spawned CUDA contexts, the per-engine memory share, the staggered memory profiles). Skipped
without CUDA; the lead runs it on the H200."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from producer.broker import MODELS_COMMAND
from producer.client import Client
from tests.fleet.conftest import EMBEDFLEET, PersistentRedis, WorkerProcess, make_corpus

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]


def test_two_engines_on_one_gpu_share_a_bulk_job(tmp_path: Path, redis_broker: PersistentRedis,
                                                 workers: list[WorkerProcess], bundled_model: Path) -> None:
    worker = WorkerProcess(redis_broker.url, bundled_model, tmp_path / "worker.log", concurrency=2)
    worker.args = [EMBEDFLEET, "worker", "--broker", redis_broker.url, "--model", str(bundled_model),
                   "--device", "cuda", "--devices", "0,0", "--backend", "torch", "--concurrency", "2", "--verbose",
                   "--storage-root", str(tmp_path)]
    worker.env.pop("OMP_NUM_THREADS")
    workers.append(worker.start())
    worker.wait_ready(timeout=300)
    log = " ".join(worker.log().split())
    budgets = [int(b) for b in re.findall(r"engine cuda:0 \(pid \d+\): [^,]+, batches of <= (\d+) tokens", log)]
    assert len(budgets) == 2, log[-3000:]

    corpus = make_corpus(tmp_path / "corpus.parquet", 20_000, seed=11)
    client = Client(broker=redis_broker.url)
    started = time.monotonic()
    handle = client.submit_corpus(str(corpus), str(tmp_path / "out"), model=str(bundled_model), id_column="id",
                                  shard_rows=500)
    manifest = handle.wait(timeout=300)
    seconds = time.monotonic() - started
    assert manifest.status == "complete" and manifest.rows_written == 20_000
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20_000
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)

    replies = client.app.control.broadcast(MODELS_COMMAND, reply=True, timeout=5.0)
    answers = {name: answer["models"][0] for reply in replies for name, answer in reply.items()}
    assert len(answers) == 2 and all(m["device"] == "cuda:0" for m in answers.values())
    batches = {name: m["stats"].get("batches", 0) for name, m in answers.items()}
    assert all(n > 0 for n in batches.values()), f"an engine did no work: {batches}"
    print(f"--devices 0,0: 20,000 rows, {manifest.n_tokens:,} tokens in {seconds:.1f} s "
          f"({manifest.n_tokens / seconds:,.0f} tokens/s of job time); budgets {budgets}; batches {batches}")


def test_run_and_embedded_serve_on_two_engines_of_one_gpu(tmp_path: Path, workers: list[WorkerProcess],
                                                          bundled_model: Path) -> None:
    """``embedfleet run`` and embedded ``serve`` with ``--devices 0,0``: the same engine processes on
    a private redis-server (``worker.hosting.local_fleet``), on the GPU."""
    import httpx

    from tests.conftest import free_port

    corpus = make_corpus(tmp_path / "corpus.parquet", 20_000, seed=12)
    run = WorkerProcess("unused", bundled_model, tmp_path / "run.log")
    run.args = [EMBEDFLEET, "run", str(corpus), "--out", str(tmp_path / "out"), "--model", str(bundled_model),
                "--device", "cuda", "--devices", "0,0", "--backend", "torch", "--shard-rows", "500"]
    run.env.pop("OMP_NUM_THREADS")
    workers.append(run.start())
    assert run.proc is not None and run.proc.wait(400) == 0, run.log()[-3000:]
    log = " ".join(run.log().split())
    work = {pid: int(n.replace(",", "")) for pid, n in
            re.findall(r"engine cuda:0 \(pid (\d+)\): ([\d,]+) batches", log)}
    assert len(work) == 2 and all(n > 0 for n in work.values()), f"an engine did no work: {work}\n{log[-2000:]}"
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20_000
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    print(re.search(r"complete: .*? tokens/s", log).group(0) if "complete:" in log else log[-500:], work)

    port = free_port()
    serve = WorkerProcess("unused", bundled_model, tmp_path / "serve.log")
    serve.args = [EMBEDFLEET, "serve", "--device", "cuda", "--devices", "0,0", "--backend", "torch",
                  "--port", str(port)]
    serve.env.pop("OMP_NUM_THREADS")
    workers.append(serve.start())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    body: dict = {}
    while time.monotonic() < deadline and serve.proc.poll() is None:  # type: ignore[union-attr]
        try:
            reply = httpx.get(f"{url}/health", timeout=5)
            body = reply.json() if reply.status_code == 200 else {}
        except httpx.HTTPError:
            body = {}
        if body and sum(m["workers"] for m in body["models"].values()) == 2:
            break
        time.sleep(0.5)
    assert body, serve.log()[-3000:]
    (served,) = body["models"].values()
    assert [d["device"] for d in served["devices"]] == ["cuda:0", "cuda:0"], body
    texts = [f"query number {i}" for i in range(64)]
    got = [httpx.post(f"{url}/v1/embeddings", json={"input": texts[i:i + 8]}, timeout=60) for i in range(0, 64, 8)]
    assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200]
    vectors = np.array([d["embedding"] for r in got for d in r.json()["data"]], dtype=np.float32)
    assert vectors.shape[0] == 64 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
