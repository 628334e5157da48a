"""Parking on evidence (``worker.hosting.isolation``), on a real redis-server: a poison shard that
kills its worker while other shards run beside it. Only the poison shard is parked; the shards
that died with it run alone next, complete, and every row is written once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from producer.client import Client, JobHandle
from tests.fleet import faulty_worker

from .conftest import PersistentRedis, WorkerProcess, make_corpus, reference_vectors

FAULTY = str(Path(faulty_worker.__file__))


def faulty(broker: str, model: Path, log: Path, env: dict[str, str], concurrency: int) -> WorkerProcess:
    """A worker whose shard task carries the test faults of ``tests/fleet/faulty_worker.py``."""
    worker = WorkerProcess(broker, model, log, env, concurrency=concurrency)
    worker.args = [sys.executable, FAULTY] + worker.args[1:]
    return worker


def test_a_poison_shard_is_parked_alone_and_its_neighbours_complete(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], tiny_embed_model: Path
) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 1200, seed=7)
    table = pq.read_table(corpus)
    texts = table.column("text").to_pylist()
    texts[5] = f"{texts[5]} {faulty_worker.KILL_MARK}"  # shard 0 of 6 is the poison
    pq.write_table(table.set_column(1, "text", pa.array(texts)), corpus, row_group_size=200)
    # two shards held (no read-ahead): the poison takes exactly one neighbour down
    env = {"EMBEDFLEET_LIVENESS_TTL": "3", "EMBEDFLEET_MAX_DELIVERIES": "1", "EMBEDFLEET_BACKEND": "torch",
           "EMBEDFLEET_SHARD_LOOKAHEAD": "0"}
    worker = faulty(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", env, concurrency=2)
    workers.append(worker.start())
    worker.wait_ready()
    out = tmp_path / "out"
    Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                  id_column="id", shard_rows=200)
    handle = JobHandle.open(str(out))
    deaths = 0
    deadline = time.monotonic() + 150
    while not (out / "_manifest.json").exists():
        assert time.monotonic() < deadline, f"job not finished; worker log:\n{worker.log()[-4000:]}"
        if worker.proc is not None and worker.proc.poll() is not None:
            assert worker.proc.returncode == 70, worker.log()[-3000:]
            deaths += 1
            worker.start()
        time.sleep(0.1)
    manifest = handle.wait(timeout=10, raise_on_failure=False)
    log = worker.log()
    assert manifest.status == "partial"
    assert [s.index for s in manifest.failed_shards] == [0]
    failure = manifest.failed_shards[0].failure or ""
    assert "parked after 1 deliveries" in failure and "lost together with other shards" in failure, failure
    assert "exiting with 1 other shard(s) running" in log, "the poison never took a neighbour down"
    assert "runs alone next" in log
    marks = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))]
    innocents = [m for m in marks if m["index"] != 0]
    assert [m["status"] for m in innocents] == ["done"] * 5
    assert any(m["deliveries"] > 1 for m in innocents), "no innocent shard died with the poison"
    written = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = written.column("id").to_pylist()
    want_ids = table.column("id").to_pylist()[200:]
    assert sorted(ids) == want_ids, "rows lost or written twice"
    order = {id_: i for i, id_ in enumerate(ids)}
    import numpy as np

    got = np.stack(written.column("embedding").to_numpy(zero_copy_only=False))[[order[i] for i in want_ids]]
    np.testing.assert_allclose(got, reference_vectors(tiny_embed_model, texts[200:]), atol=2e-5, rtol=0)
    print(f"deaths={deaths} parked=[0] innocent shards redelivered="
          f"{sum(m['deliveries'] > 1 for m in innocents)} rows written={len(ids)} once each")
