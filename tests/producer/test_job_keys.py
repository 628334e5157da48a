"""A job's Redis keys expire (EMBEDFLEET_JOB_TTL) instead of staying forever, and ``status <id>``
finds the job for that long (the result backend's hour was shorter than the job record's use)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import RedisServer


def test_every_key_a_submission_writes_has_the_jobs_ttl(redis_server: RedisServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.broker import JOBS_KEY, find_job_out
    from producer.cli import remember_job
    from producer.client import Client

    monkeypatch.setenv("EMBEDFLEET_JOB_TTL", "7200")
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"text {i}" for i in range(5)]}), source)
    client = Client(broker=redis_server.url)
    handle = client.submit_corpus(str(source), str(tmp_path / "out"), shard_rows=2)
    remember_job(client, handle)
    redis = redis_server.client()
    keys = [k.decode() for k in redis.keys("*") if handle.job_id in k.decode()]
    assert len(keys) == 2, keys  # the shard list and the id -> output record
    for key in keys:
        assert 3600 < redis.ttl(key) <= 7200, (key, redis.ttl(key))
    assert redis.sismember(JOBS_KEY, handle.job_id)  # the index the sweeper prunes once the list is gone
    assert find_job_out(client.app, handle.job_id) == str(tmp_path / "out")
