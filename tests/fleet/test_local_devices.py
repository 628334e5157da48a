"""``embedfleet run`` and embedded ``serve`` on several devices (``--devices cpu:2``): one engine
process per device on a private host-local redis-server, as ``worker --devices`` runs them.

run: both engines take shards of the job, one engine process is killed with SIGKILL mid-run and
restarted, the job completes with every row once and the vectors of a clean run. serve: requests
are answered by both engines, /health and /v1/models name each engine's device, SIGTERM stops
the server, its engines and its redis-server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port
from tests.fleet.conftest import EMBEDFLEET, WorkerProcess, make_corpus, reference_vectors, wait_for
from tests.fleet.test_devices_fleet import FAST_REDELIVERY, engine_pids, gone, markers

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid`` (engine processes, redis-server), whichever thread started them."""
    return sorted({int(p) for task in Path(f"/proc/{pid}/task").iterdir()
                   for p in (task / "children").read_text().split()})


def command(tmp_path: Path, name: str, args: list[str]) -> WorkerProcess:
    """An ``embedfleet`` command as a watched child process (its log in ``tmp_path/name.log``)."""
    process = WorkerProcess("unused", tmp_path, tmp_path / f"{name}.log", FAST_REDELIVERY)
    process.args = [EMBEDFLEET, *args]
    return process


def test_run_on_two_cpu_engines_shares_the_job_and_survives_a_killed_engine(
        tmp_path: Path, workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 3000, seed=5)
    out = tmp_path / "out"
    run = command(tmp_path, "run", ["run", str(corpus), "--out", str(out), "--model", str(tiny_embed_model),
                                    "--device", "cpu", "--devices", "cpu:2", "--backend", "torch",
                                    "--shard-rows", "150", "--concurrency", "1", "--verbose"])
    workers.append(run.start())
    first = wait_for(lambda: (p := engine_pids(run)) and len(p) == 2 and p, 120, "two engine processes ready")
    assert sorted(first) == ["cpu:0", "cpu:1"]

    wait_for(lambda: "cpu:1" in [m["device"] for m in markers(out)] or run.proc.poll() is not None, 120,  # type: ignore[union-attr]
             "a shard done by engine cpu:1")
    assert run.proc is not None and run.proc.poll() is None, f"the job ended before the kill:\n{run.log()[-3000:]}"
    victim = first["cpu:1"][0]
    os.kill(victim, signal.SIGKILL)  # like a CUDA error that takes the process down
    assert run.proc.wait(180) == 0, run.log()[-3000:]
    log = " ".join(run.log().split())
    assert "died with signal 9; restarting it in 1 s" in log
    # restarted (the job may end before the new engine is ready: the others took its shards)
    assert len(re.findall(r"engine cpu:1: started \(pid \d+\)", log)) == 2, log[-3000:]
    assert "complete: 3,000 of 3,000 rows written" in log
    work = re.findall(r"engine (cpu:\d) \(pid \d+\): ([\d,]+) batches", log)
    assert "cpu:0" in dict(work) and int(dict(work)["cpu:0"].replace(",", "")) > 0, log[-2000:]

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_written"] == 3000
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3000, "a row was lost or written twice"
    source = pq.read_table(corpus)
    order = {id_: i for i, id_ in enumerate(ids)}
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    got = got[[order[i] for i in source.column("id").to_pylist()]]
    np.testing.assert_allclose(got, reference_vectors(tiny_embed_model, source.column("text").to_pylist()),
                               atol=2e-5, rtol=0)
    done_by = [m["device"] for m in markers(out)]
    assert set(done_by) == {"cpu:0", "cpu:1"}, f"one engine did all the work: {done_by}"
    assert all(gone(pid) for pids in engine_pids(run).values() for pid in pids), "an engine outlived the run"


def test_embedded_serve_on_two_cpu_engines_answers_from_both_and_reports_each(
        tmp_path: Path, workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    port = free_port()
    serve = command(tmp_path, "serve", ["serve", "--model", str(tiny_embed_model), "--device", "cpu",
                                        "--devices", "cpu:2", "--backend", "torch", "--port", str(port),
                                        "--verbose"])
    workers.append(serve.start())
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: "embedfleet serve on" in serve.log() or serve.proc.poll() is not None, 180,  # type: ignore[union-attr]
             "the server to listen")
    assert serve.proc is not None and serve.proc.poll() is None, serve.log()[-3000:]
    assert "2 engine processes (cpu:0, cpu:1)" in " ".join(serve.log().split())

    def health() -> dict | None:
        try:
            reply = httpx.get(f"{url}/health", timeout=10)
        except httpx.HTTPError:
            return None
        body = reply.json() if reply.status_code == 200 else None
        return body if body and sum(m["workers"] for m in body["models"].values()) == 2 else None

    body = wait_for(health, 60, "/health with both engines", 0.2)
    (served,) = body["models"].values()
    assert sorted(d["device"] for d in served["devices"]) == ["cpu:0", "cpu:1"]
    assert all(d["max_batch_tokens"] > 0 for d in served["devices"])
    (card,) = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert sorted(card["devices"]) == ["cpu:0", "cpu:1"]

    texts = [f"request {i} about the weather in town {i % 7}" for i in range(16)]
    expected = reference_vectors(tiny_embed_model, texts)

    def embed(i: int) -> np.ndarray:
        reply = httpx.post(f"{url}/v1/embeddings", json={"model": card["id"], "input": texts[i]}, timeout=30)
        assert reply.status_code == 200, reply.text
        return np.asarray(reply.json()["data"][0]["embedding"], dtype=np.float32)

    def device_tokens() -> dict[str, float]:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'embedfleet_device_batch_tokens_total\{.*device="(cpu:\d)".*\} (\S+)', metrics)}

    def both_answered() -> dict[str, float] | None:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(embed, range(len(texts))))
        np.testing.assert_allclose(np.stack(got), expected, atol=2e-5, rtol=0)
        tokens = device_tokens()
        return tokens if sorted(tokens) == ["cpu:0", "cpu:1"] and all(v > 0 for v in tokens.values()) else None

    wait_for(both_answered, 120, "requests answered by both engines", 0.5)

    children = children_of(serve.proc.pid)
    names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in children]
    assert names.count("redis-server") == 1 and len(children) >= 3, f"two engines and redis-server: {names}"
    serve.proc.send_signal(signal.SIGTERM)
    code = serve.proc.wait(60)
    # after its clean shutdown uvicorn raises the signal it caught again (as embedded serve on one device)
    assert code in (0, -signal.SIGTERM), (code, serve.log()[-1000:])
    assert "Application shutdown complete" in serve.log()
    wait_for(lambda: all(gone(pid) for pid in children), 20, "the engines and redis-server to exit")


def test_without_redis_server_several_devices_are_a_clear_error(tmp_path: Path, tiny_embed_model: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 10)
    run = command(tmp_path, "run", ["run", str(corpus), "--out", str(tmp_path / "out"), "--model",
                                    str(tiny_embed_model), "--device", "cpu", "--devices", "cpu:2"])
    run.env["EMBEDFLEET_REDIS_SERVER"] = str(tmp_path / "no-such-redis-server")
    run.start()
    assert run.proc is not None and run.proc.wait(120) != 0
    log = " ".join(run.log().split())
    assert "several devices on one host need redis-server" in log and "EMBEDFLEET_REDIS_SERVER" in log, log[-2000:]
    assert not (tmp_path / "out" / "_job.json").exists()  # refused before anything was queued


def test_options_an_engine_refuses_end_the_run_before_anything_is_queued(tmp_path: Path,
                                                                          tiny_embed_model: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 10)
    run = command(tmp_path, "run", ["run", str(corpus), "--out", str(tmp_path / "out"), "--model",
                                    str(tiny_embed_model), "--device", "cpu", "--devices", "cpu:2",
                                    "--backend", "torch", "--dimensions", "9999"])
    run.start()
    assert run.proc is not None and run.proc.wait(180) == 2, run.log()[-2000:]
    assert "dimensions=9999 is over the model's 32 dimensions" in " ".join(run.log().split())
    assert not (tmp_path / "out").exists()
