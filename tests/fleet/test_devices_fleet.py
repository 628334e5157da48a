"""One worker command, several engine processes (``--devices cpu:2``) on a real Redis.

Both engines take shards of one job; one engine process is killed with SIGKILL mid-job and its
parent restarts it; the job completes with every row once; the facade's /health, /v1/models and
/metrics name each engine's device; SIGTERM to the parent stops parent and children.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from producer.broker import SHARD_TASK
from producer.client import Client
from producer.jobs import marker_name
from producer.http.app import create_app
from producer.http.settings import FacadeSettings
from tests.fleet.conftest import PersistentRedis, WorkerProcess, count_markers, make_corpus, reference_vectors, wait_for
from tests.http.servers import ServerThread

pytestmark = pytest.mark.timeout(300)

FAST_REDELIVERY = {"EMBEDFLEET_VISIBILITY_TIMEOUT": "4", "EMBEDFLEET_SWEEP_INTERVAL": "3",
                   "EMBEDFLEET_MAX_DELIVERIES": "10"}
ENGINE_LINE = re.compile(r"engine (cpu:\d) \(pid (\d+)\): ")


def engine_pids(worker: WorkerProcess) -> dict[str, list[int]]:
    """Each device's engine pids in the order they became ready (a restart appends one)."""
    pids: dict[str, list[int]] = {}
    for label, pid in ENGINE_LINE.findall(" ".join(worker.log().split())):
        pids.setdefault(label, []).append(int(pid))
    return pids


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has let go of everything


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))]


def test_two_engine_processes_share_a_job_survive_a_kill_and_stop_together(
        tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    worker = WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", FAST_REDELIVERY,
                           concurrency=1)
    worker.args += ["--devices", "cpu:2", "--backend", "torch"]
    workers.append(worker.start())
    worker.wait_ready()
    first = engine_pids(worker)
    assert sorted(first) == ["cpu:0", "cpu:1"] and all(len(p) == 1 for p in first.values())

    corpus = make_corpus(tmp_path / "corpus.parquet", 4000, seed=7)
    out = tmp_path / "out"
    handle = Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                           id_column="id", shard_rows=200)
    assert handle.n_shards == 20
    control = Client(broker=redis_broker.url).app.control

    def held_by(pid: int) -> str | None:
        """The shard index (as text, so shard 0 is truthy) engine cpu:1 runs unacknowledged, if any."""
        name = f"embedfleet-{pid}-cpu1@{socket.gethostname()}"
        active = control.inspect(destination=[name], timeout=1.0).active() or {}
        for task in active.get(name, []):
            if task["name"] == SHARD_TASK and isinstance(task.get("args"), list):
                return str(task["args"][0]["shard"]["index"])
        return None

    wait_for(lambda: "cpu:1" in [m["device"] for m in markers(out)], 120, "a shard done by engine cpu:1")
    # kill engine cpu:1 mid-shard; a kill that lands after the shard's marker but before its ack does
    # not count as mid-shard (the redelivery is skipped as done), so try again on the restarted engine
    hit, victim = None, first["cpu:1"][0]
    for attempt in range(3):
        def mid_shard() -> str | None:  # running, unacknowledged, and its output not yet published
            held = held_by(victim)
            return held if held is not None and not (out / "_parts" / marker_name(int(held))).exists() else None

        index = wait_for(mid_shard, 120, f"engine cpu:1 in the middle of a shard (try {attempt + 1}, "
                         f"{count_markers(out)} of 20 shards done)", 0.01)
        os.kill(victim, signal.SIGKILL)  # like a CUDA error that takes the process down
        done_before = (out / "_parts" / marker_name(int(index))).exists()
        wait_for(lambda: len(engine_pids(worker).get("cpu:1", [])) == attempt + 2, 120, "the killed engine restarted")
        assert engine_pids(worker)["cpu:1"][-1] != victim
        victim = engine_pids(worker)["cpu:1"][-1]
        if not done_before:
            hit = int(index)
            break
    assert hit is not None, "no kill landed mid-shard in 3 tries"
    assert "died with signal 9; restarting it in 1 s" in " ".join(worker.log().split())

    manifest = handle.wait(timeout=180)
    assert manifest.status == "complete" and manifest.rows_written == 4000
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4000, "a row was lost or written twice"
    source = pq.read_table(corpus)
    order = {id_: i for i, id_ in enumerate(ids)}
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[[order[i] for i in source.column("id").to_pylist()]]
    np.testing.assert_allclose(got, reference_vectors(tiny_embed_model, source.column("text").to_pylist()),
                               atol=2e-5, rtol=0)
    done_by = [m["device"] for m in markers(out)]
    assert set(done_by) == {"cpu:0", "cpu:1"}, f"one engine did all the work: {done_by}"
    assert json.loads((out / "_parts" / marker_name(hit)).read_text())["deliveries"] >= 2, \
        "the shard killed mid-way was not delivered again"

    # the facade sees one worker per engine process, each with its device
    facade = ServerThread(create_app(Client(broker=redis_broker.url),
                                     FacadeSettings(models=[str(tiny_embed_model)], refresh_s=0.5))).start()
    try:
        def health() -> dict | None:
            reply = httpx.get(f"{facade.url}/health", timeout=10)
            return reply.json() if reply.status_code == 200 else None

        body = wait_for(health, 60, "a ready facade", 0.2)
        (served,) = body["models"].values()
        assert served["workers"] == 2
        assert sorted(d["device"] for d in served["devices"]) == ["cpu:0", "cpu:1"]
        assert all(d["max_batch_tokens"] > 0 for d in served["devices"])  # each engine's own budget
        (card,) = httpx.get(f"{facade.url}/v1/models", timeout=10).json()["data"]
        assert sorted(card["devices"]) == ["cpu:0", "cpu:1"]
        metrics = httpx.get(f"{facade.url}/metrics", timeout=10).text
        tokens = {m.group(1): float(m.group(2)) for m in
                  re.finditer(r'embedfleet_device_batch_tokens_total\{.*device="(cpu:\d)".*\} (\S+)', metrics)}
        # one series per engine; the restarted engine counts from its restart (it may have had no work since)
        assert sorted(tokens) == ["cpu:0", "cpu:1"] and tokens["cpu:0"] > 0
    finally:
        facade.stop()

    # SIGTERM to the parent stops it and both engine processes
    children = [pids[-1] for pids in engine_pids(worker).values()]
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(40) == 0
    wait_for(lambda: all(gone(pid) for pid in children), 10, "the engine processes to exit")

