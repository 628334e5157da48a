"""Shards whose failure could not be written to an unwritable output are recorded on the broker's
Redis; a job handle counts them and ends the wait with the storage error instead of waiting forever."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.broker import record_unwritten
from producer.client import JobHandle, plan_corpus
from producer.errors import JobFailed
from producer.jobs import ShardReport
from tests.conftest import RedisServer
from worker.sinks import write_marker


def test_a_job_whose_shards_are_recorded_unwritable_fails_with_the_error(redis_server: RedisServer,
                                                                          tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(4)]}), corpus)
    spec = plan_corpus(str(corpus), str(tmp_path / "out"), model="tiny", shard_rows=2)
    handle = JobHandle.open(spec.out, broker=redis_server.url)
    write_marker(spec.out, ShardReport(index=0, path="part-00000.parquet", rows_in=2, rows_written=2, n_tokens=4))
    assert not handle.progress().finished
    record_unwritten(redis_server.url, spec.job_id, 1, "OSError: [Errno 28] No space left on device")
    progress = handle.progress()
    assert progress.finished and progress.shards_failed == 1
    with pytest.raises(JobFailed, match=r"1 shard\(s\) could not be written .*No space left on device"):
        handle.wait(timeout=5, raise_on_failure=False)
    assert JobHandle.open(spec.out).unwritten() == {}  # without the broker: nothing to read
