"""Shard time limits on a real redis-server (``worker.hosting.limits``): a shard whose source reads
forever in Python is stopped at its soft limit and parked; one whose read blocks in a C call makes
the worker stop itself at the hard limit, and the next worker parks it. The other shards complete,
every row once."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from producer.client import Client, JobHandle
from tests.fleet import faulty_worker
from worker.hosting.limits import EXIT_TIME_LIMIT

from .conftest import PersistentRedis, WorkerProcess, make_corpus
from .test_isolation import faulty

#: soft = 5 s + 0.01 s x 200 rows = 7 s, hard = 10 s; a clean 200-row shard takes well under a second.
LIMITS = {"EMBEDFLEET_SHARD_TIME_BASE": "5", "EMBEDFLEET_SHARD_TIME_PER_ROW": "0.01",
          "EMBEDFLEET_SHARD_TIME_GRACE": "3", "EMBEDFLEET_STOP_GRACE": "3"}


def test_slow_and_blocking_sources_are_stopped_by_their_time_limits(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], tiny_embed_model: Path
) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 800, seed=8)
    table = pq.read_table(corpus)
    texts = table.column("text").to_pylist()
    texts[210] = f"{texts[210]} {faulty_worker.SLOW_MARK}"  # shard 1
    texts[420] = f"{texts[420]} {faulty_worker.BLOCK_MARK}"  # shard 2
    pq.write_table(table.set_column(1, "text", pa.array(texts)), corpus, row_group_size=200)
    env = {**LIMITS, "EMBEDFLEET_LIVENESS_TTL": "3", "EMBEDFLEET_MAX_DELIVERIES": "1",
           "EMBEDFLEET_BACKEND": "torch"}
    worker = faulty(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", env, concurrency=2)
    workers.append(worker.start())
    worker.wait_ready()
    out = tmp_path / "out"
    Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                  id_column="id", shard_rows=200)
    exits = []
    deadline = time.monotonic() + 150
    while not (out / "_manifest.json").exists():
        assert time.monotonic() < deadline, f"job not finished; worker log:\n{worker.log()[-4000:]}"
        if worker.proc is not None and worker.proc.poll() is not None:
            exits.append(worker.proc.returncode)
            worker.start()
        time.sleep(0.1)
    manifest = JobHandle.open(str(out)).wait(timeout=10, raise_on_failure=False)
    failures = {s.index: s.failure or "" for s in manifest.failed_shards}
    assert sorted(failures) == [1, 2], failures
    assert "ShardTimeLimit" in failures[1] and "soft time limit of 7 s" in failures[1], failures[1]
    assert "hard time limit of 10 s" in failures[2] and "parked after 1 deliveries" in failures[2], failures[2]
    assert exits[:1] == [EXIT_TIME_LIMIT], exits
    assert "stopping this worker: a shard thread is stuck past its hard time limit" in worker.log()
    ids = pq.read_table(sorted(out.glob("part-*.parquet"))).column("id").to_pylist()
    want = table.column("id").to_pylist()
    assert sorted(ids) == want[:200] + want[600:], "rows lost or written twice"
    print(f"worker exits={exits} parked={sorted(failures)} rows written={len(ids)} once each")
