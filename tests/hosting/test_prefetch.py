"""Bulk prefetch on a real Redis: shards read ahead wait in the engine while others run; a shard
that fails mid-way (some of its batches computed, the next shards already in the engine) is sent
again, and every row of every shard lands in the output exactly once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from producer.client import Client
from producer.storage import read_markers
from tests.conftest import RedisServer
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.trust import StorageRoots

ROWS, SHARD_ROWS = 60, 10


def test_bulk_prefetch_writes_every_row_once_when_a_shard_fails_midway(
        redis_server: RedisServer, tiny_embed_model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.parquet"
    texts = [f"text {i} " + "word " * (i % 7) for i in range(ROWS)]
    pq.write_table(pa.table({"id": [f"r{i:03d}" for i in range(ROWS)], "text": texts}), corpus)
    out = tmp_path / "out"
    # small batches, so a shard takes several; one shard computes while two are read ahead
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                      concurrency=1, lookahead=2, max_batch_tokens=40,
                      storage_roots=StorageRoots.parse([str(tmp_path)]))
    with InProcessWorker(spec, broker=redis_server.url, handle_signals=False) as worker:
        engine = worker.engines[0]
        launch = engine.backend.launch
        seen: dict[str, Any] = {"batches": 0}
        lock = threading.Lock()

        def failing_launch(batch: Any) -> Any:
            with lock:
                seen["batches"] += 1
                # the 4th batch: earlier ones were computed, and more than one shard is in the engine
                if seen["batches"] == 4:
                    seen["open_at_failure"] = len(engine._open)
                    raise RuntimeError("device fault (injected)")
            return launch(batch)

        engine.backend.launch = failing_launch  # type: ignore[method-assign]
        handle = Client(broker=redis_server.url).submit_corpus(
            str(corpus), str(out), model=str(tiny_embed_model), id_column="id", shard_rows=SHARD_ROWS)
        manifest = handle.wait(timeout=240, poll=0.1)

    assert seen["open_at_failure"] >= 2  # the failure came while a shard read ahead was in the engine
    assert manifest.status == "complete"
    assert manifest.rows_written == ROWS
    ids = pa.concat_tables([pq.read_table(p, columns=["id"]) for p in sorted(out.glob("part-*.parquet"))])
    assert sorted(ids.column("id").to_pylist()) == [f"r{i:03d}" for i in range(ROWS)]  # each once
    markers = read_markers(str(out))
    assert sorted(markers) == list(range(ROWS // SHARD_ROWS))
    assert all(m.status == "done" and m.rows_written == SHARD_ROWS for m in markers.values())
    retried = [m.index for m in markers.values() if m.deliveries > 1]
    assert retried  # the failed shard(s) were sent again, and their second delivery is what was written
