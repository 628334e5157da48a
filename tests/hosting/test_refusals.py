"""A refused shard message ends its shard failed only when it is what its job recorded.

Before: every refusal was acknowledged and dropped, so a job whose own shard was refused (its
source outside the worker's storage roots, or a producer without the signing key) never ended,
and on Redis the sweeper re-sent that shard every sweep. Recording every refusal instead would
let a forged message fail a legitimate pending shard; so a refusal counts only where it matches
the job's record: the output folder's ``_job.json`` (signed, when a key is held) or the message
``record_job`` kept on Redis. Everything here is real: in-process workers on a real redis-server
or the in-memory broker, real Parquet, the tiny model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
import pytest

from producer.broker import (JOB_UNWRITTEN_KEY, MEMORY_BROKER, SHARD_TASK, make_app, record_unwritten, recorded_shard,
                             unwritten_shards)
from producer.client import Client, JobHandle
from producer.errors import JobFailed
from producer.storage import read_manifest
from tests.conftest import RedisServer
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.sweeper import Sweeper
from worker.hosting.trust import StorageRoots

#: seconds a job of a few rows is given: it takes well under one; before the fix it never ended
JOB_TIMEOUT_S = 30


def _corpus(path: Path, n: int = 20) -> Path:
    path.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(n)))
    return path


def _worker(model: Path, root: Path, broker: str) -> InProcessWorker:
    spec = WorkerSpec(models=[str(model)], device="cpu", backend="torch", dtype="float32", concurrency=1,
                      storage_roots=StorageRoots.parse([str(root)]))
    return InProcessWorker(spec, broker=broker, handle_signals=False)


def test_a_job_whose_source_is_refused_ends_with_its_shards_failed(tiny_embed_model: Path, tmp_path: Path) -> None:
    """The corpus is a symlink out of the worker's root: each shard's source is refused, but the
    output folder is inside and its ``_job.json`` plans the shard, so the failure is written there
    and the manifest names every shard with the reason. Nothing of the source is read."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), elsewhere.mkdir()
    (data / "corpus.jsonl").symlink_to(_corpus(elsewhere / "corpus.jsonl"))
    with _worker(tiny_embed_model, data, MEMORY_BROKER) as worker:
        handle = Client(app=worker.app).submit_corpus(str(data / "corpus.jsonl"), str(data / "out"),
                                                      model=str(tiny_embed_model), shard_rows=10)
        with pytest.raises(JobFailed, match="shards 0, 1 failed"):
            handle.wait(timeout=JOB_TIMEOUT_S, poll=0.1)
    manifest = read_manifest(str(data / "out"))
    assert manifest is not None and manifest.status == "partial" and manifest.rows_written == 0
    assert [s.index for s in manifest.failed_shards] == [0, 1]
    for shard in manifest.failed_shards:
        assert shard.failure is not None and shard.failure.startswith("refused: shard.uri: ")
        assert "outside the worker's storage roots" in shard.failure
    assert not list((data / "out").glob("part-*.parquet"))


def test_an_unsigned_job_ends_failed_and_is_not_sent_again(tiny_embed_model: Path, tmp_path: Path,
                                                           redis_server: RedisServer,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A producer without the key, workers with it: each shard is refused (unsigned). The message
    is the one the producer recorded on Redis, so the refusal is recorded beside the queue (not in
    the output folder: an unsigned message may not write anything), the job ends failed with the
    reason, and the sweeper leaves the shards alone (before: re-sent every sweep, the job never ended)."""
    monkeypatch.delenv("EMBEDFLEET_SIGNING_KEY", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    corpus = _corpus(data / "corpus.jsonl")
    handle = Client(broker=redis_server.url).submit_corpus(str(corpus), str(data / "out"),
                                                           model=str(tiny_embed_model), shard_rows=10)
    monkeypatch.setenv("EMBEDFLEET_SIGNING_KEY", "the workers' key")
    caplog.set_level(logging.ERROR, logger="worker.hosting.tasks")
    with _worker(tiny_embed_model, data, redis_server.url) as worker:
        with pytest.raises(JobFailed, match=r"2 shard\(s\) could not be written .*refused: the message is unsigned"):
            handle.wait(timeout=JOB_TIMEOUT_S, poll=0.1)
        assert Sweeper(worker.app, redis_server.url, worker.queues).sweep() == 0  # over, not lost
    assert caplog.text.count("refusing shard message") == 2, caplog.text
    assert "recorded as failed beside the queue" in caplog.text
    recorded = redis_server.client().hgetall(JOB_UNWRITTEN_KEY.format(handle.job_id))
    assert sorted(recorded) == [b"0", b"1"]
    assert not (data / "out" / "_parts").exists()  # nothing written where the message points


def test_a_forged_copy_of_a_pending_shard_is_dropped_and_the_shard_completes(
        tiny_embed_model: Path, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Producer and workers hold the key. Someone without it copies a pending shard's message and
    sends it unsigned, first: it differs from the recorded one (the signature), so its refusal is
    dropped; the real message then runs and the job completes. Recording it naively would have
    failed the shard (a failure marker, or a record beside the queue, before the real one ran)."""
    monkeypatch.setenv("EMBEDFLEET_SIGNING_KEY", "s3cret")
    data = tmp_path / "data"
    data.mkdir()
    corpus = _corpus(data / "corpus.jsonl")
    handle = Client(broker=redis_server.url).submit_corpus(str(corpus), str(data / "out"),
                                                           model=str(tiny_embed_model), shard_rows=10)
    real = recorded_shard(redis_server.url, handle.job_id, 1)
    assert real is not None and real["signature"]
    forged = {k: v for k, v in real.items() if k != "signature"}
    assert handle.queue is not None
    make_app(redis_server.url).send_task(SHARD_TASK, args=[forged], queue=handle.queue, task_id="forged")
    redis = redis_server.client()
    redis.lmove(handle.queue, handle.queue, "LEFT", "RIGHT")  # the forged one (pushed last) is popped first
    caplog.set_level(logging.ERROR, logger="worker.hosting.tasks")
    with _worker(tiny_embed_model, data, redis_server.url):
        manifest = handle.wait(timeout=JOB_TIMEOUT_S, poll=0.1)
    assert manifest.status == "complete" and manifest.rows_written == 20
    assert caplog.text.count("refusing shard message") == 1 and "not the message its job recorded: dropped" \
        in caplog.text, caplog.text
    assert not redis.exists(JOB_UNWRITTEN_KEY.format(handle.job_id))


def test_a_resumed_shard_is_no_longer_recorded_over(tmp_path: Path, redis_server: RedisServer) -> None:
    """``resume`` after fixing the cause sends a shard recorded beside the queue again: its old record
    goes, or the sweeper would skip it and the job would still count it failed."""
    data = tmp_path / "data"
    data.mkdir()
    client = Client(broker=redis_server.url)
    handle = client.submit_corpus(str(_corpus(data / "corpus.jsonl")), str(data / "out"), model="tiny",
                                  shard_rows=10)
    record_unwritten(redis_server.url, handle.job_id, 1, "refused: the message is unsigned")
    assert unwritten_shards(redis_server.url, handle.job_id) == {1: "refused: the message is unsigned"}
    client.resume(str(data / "out"))
    assert unwritten_shards(redis_server.url, handle.job_id) == {}
    assert JobHandle.open(str(data / "out"), broker=redis_server.url).progress().shards_failed == 0
