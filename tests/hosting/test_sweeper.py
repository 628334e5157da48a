"""The sweeper re-sends exactly the shard messages Redis lost: not queued, not unacked, not done."""

from __future__ import annotations

import json
from pathlib import Path

from producer.broker import JOB_SHARDS_KEY, JOBS_KEY, SHARD_TASK, make_app, record_job, record_unwritten
from producer.jobs import MANIFEST, ShardReport
from producer.storage import locate, publish_json
from tests.conftest import RedisServer
from worker.hosting.sweeper import UNACKED_KEY, Sweeper
from worker.sinks import write_marker

QUEUE = "embed.tiny"


def _recorded(out: Path, job_id: str) -> dict[int, dict]:
    return {i: {"task_id": f"{job_id}-{i:05d}-x", "queue": QUEUE, "payload": {"out": str(out), "index": i}}
            for i in range(3)}


def test_only_lost_shards_are_sent_again(redis_server: RedisServer, tmp_path: Path) -> None:
    app = make_app(redis_server.url)
    out = tmp_path / "out"
    shards = _recorded(out, "job1")
    record_job(app, "job1", shards)
    write_marker(str(out), ShardReport(index=0, path="part-00000.parquet", rows_in=1, rows_written=1, n_tokens=3))
    client = redis_server.client()
    # shard 1 is held by a live worker: kombu's unacked hash has its message
    held = [{"headers": {"id": shards[1]["task_id"]}, "body": ""}, "", QUEUE]
    client.hset(UNACKED_KEY, "tag-1", json.dumps(held))
    sweeper = Sweeper(app, redis_server.url, [QUEUE])
    assert sweeper.sweep() == 1  # shard 2: neither done, nor queued, nor held
    (raw,) = client.lrange(QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"] == shards[2]["task_id"] and message["headers"]["task"] == SHARD_TASK
    assert sweeper.sweep() == 0  # work is queued again: nothing can be told yet
    client.delete(QUEUE)
    publish_json(locate(str(out)).child(MANIFEST), {"status": "complete"})
    assert sweeper.sweep() == 0  # the job finished: it is forgotten
    assert not client.exists(JOB_SHARDS_KEY.format("job1")) and not client.sismember(JOBS_KEY, "job1")


def test_jobs_on_other_queues_are_left_alone(redis_server: RedisServer, tmp_path: Path) -> None:
    app = make_app(redis_server.url)
    record_job(app, "job2", _recorded(tmp_path / "out", "job2"))
    assert Sweeper(app, redis_server.url, ["embed.other"]).sweep() == 0
    assert redis_server.client().llen(QUEUE) == 0


def test_a_shard_recorded_unwritable_is_not_sent_again(redis_server: RedisServer, tmp_path: Path) -> None:
    """A shard parked where its failure marker could not be written is recorded beside the queue
    (``producer.broker.record_unwritten``) and acknowledged: it is over, not lost. Before, it had no
    marker, so every sweep (30 s) sent it again, to be parked and recorded again, for the job's life."""
    app = make_app(redis_server.url)
    out = tmp_path / "out"
    record_job(app, "job3", _recorded(out, "job3"))
    write_marker(str(out), ShardReport(index=0, path="part-00000.parquet", rows_in=1, rows_written=1, n_tokens=3))
    record_unwritten(redis_server.url, "job3", 1, "OSError: [Errno 28] No space left on device")
    sweeper = Sweeper(app, redis_server.url, [QUEUE])
    assert sweeper.sweep() == 1  # shard 2 alone: lost
    (raw,) = redis_server.client().lrange(QUEUE, 0, -1)
    assert json.loads(raw)["headers"]["id"] == "job3-00002-x"
