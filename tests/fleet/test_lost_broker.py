"""A Redis that loses its data (restarted without persistence) mid-job: waiting on the job says
so within the grace period, naming the shards and the command that resumes it, and
``embedfleet resume OUT`` sends the missing shards again from the output folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from producer.client import FORGOTTEN_GRACE_S, Client
from producer.errors import JobLost
import pyarrow.parquet as pq

from tests.conftest import RedisServer
from tests.fleet.conftest import EMBEDFLEET, WorkerProcess, count_markers, make_corpus, wait_for


def test_a_job_redis_forgot_is_reported_and_resumed(tmp_path: Path, workers: list[WorkerProcess],
                                                     tiny_embed_model: Path) -> None:
    redis = RedisServer(tmp_path)  # no persistence: a restart empties it
    redis.start()
    try:
        corpus = make_corpus(tmp_path / "corpus.parquet", 3000, seed=3)
        workers.append(WorkerProcess(redis.url, tiny_embed_model, tmp_path / "worker.log", concurrency=1).start())
        workers[0].wait_ready()
        out = tmp_path / "out"
        handle = Client(broker=redis.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                        id_column="id", shard_rows=100)
        wait_for(lambda: count_markers(out) >= 2, 120, "2 shards done")
        redis.stop()
        redis.start()  # same port, empty: the queue, the job's record and the unacked messages are gone
        with pytest.raises(JobLost) as lost:
            handle.wait(timeout=FORGOTTEN_GRACE_S + 90)
        message = str(lost.value)
        assert f"embedfleet resume {out} --broker {redis.url}" in message and "shards are not done" in message
        assert count_markers(out) < handle.n_shards

        resumed = subprocess.run([EMBEDFLEET, "resume", str(out), "--broker", redis.url],
                                 capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "sent again" in " ".join(resumed.stderr.split()) and resumed.stdout.strip() == handle.job_id
        manifest = handle.wait(timeout=180)
        assert manifest.status == "complete" and count_markers(out) == handle.n_shards
        ids = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["id"]).column("id").to_pylist()
        assert sorted(ids) == sorted(pq.read_table(corpus).column("id").to_pylist())  # every row once
    finally:
        for worker in workers:  # while their broker is up: without it a stopping worker waits on reconnects
            worker.stop()
        redis.stop()


def test_resume_names_a_folder_without_a_job(tmp_path: Path) -> None:
    done = subprocess.run([EMBEDFLEET, "resume", str(tmp_path), "--broker", "redis://127.0.0.1:1/0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "holds no _job.json" in " ".join((done.stdout + done.stderr).split()), done.stderr
