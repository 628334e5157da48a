"""Hostile entries pushed onto a real worker's queue with redis-py: garbage is discarded without
stopping the consumer, and shard envelopes naming files outside the storage roots, a '..' escape
or another job's folder are refused with nothing read or written; a real job then completes."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from producer.broker import SHARD_TASK, make_app
from producer.client import Client
from producer.jobs import ShardJob, queue_name
from producer.storage import read_job
from .conftest import EMBEDFLEET, PersistentRedis, WorkerProcess, count_markers, make_corpus, wait_for


def _envelope(broker: str, payload: dict) -> bytes:
    """A kombu envelope for ``payload`` as Celery writes it, taken off a scratch queue."""
    import redis

    make_app(broker).send_task(SHARD_TASK, args=[payload], queue="scratch", task_id="template")
    return redis.Redis.from_url(broker).rpop("scratch")


def _with_payload(raw: bytes, payload: dict) -> bytes:
    """The same envelope carrying another payload (Celery's body: base64 of [args, kwargs, embed])."""
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    body[0][0] = payload
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(message).encode()


def test_hostile_entries_are_discarded_or_refused_and_the_worker_goes_on(
        tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    model = str(tiny_embed_model)
    data = tmp_path / "data"
    data.mkdir()
    corpus = make_corpus(data / "corpus.parquet", 400, seed=5)
    worker = WorkerProcess(redis_broker.url, tiny_embed_model, data / "worker.log", concurrency=1)  # root: data/
    workers.append(worker.start())
    worker.wait_ready()
    client = Client(broker=redis_broker.url)
    finished = client.submit_corpus(str(corpus), str(data / "finished"), model=model, id_column="id", shard_rows=200)
    assert finished.wait(timeout=120).status == "complete"
    spec = read_job(str(data / "finished"))
    legit = ShardJob(kind=spec.kind, job_id=spec.job_id, model=spec.model, out=spec.out, columns=spec.columns,
                     options=spec.options, shard=spec.shards[0], n_shards=len(spec.shards)).model_dump(mode="json")
    manifest_before = (data / "finished" / "_manifest.json").read_bytes()
    template = _envelope(redis_broker.url, legit)
    shard = legit["shard"]
    hostile = {
        "passwd": {**legit, "shard": {**shard, "uri": "/etc/passwd", "format": "text"},
                   "columns": {**legit["columns"], "id": "text"}, "out": str(tmp_path / "x")},
        "escape": {**legit, "out": f"{data}/finished/../../escape"},
        "injected": {**legit, "shard": {**shard, "index": 99}},
    }
    garbage = [b"not json"] * 8 + [b"[]", b'{"properties": 1}']
    redis = redis_broker.client()
    queue = queue_name("embed", model)
    redis.lpush(queue, *garbage, *(_with_payload(template, p) for p in hostile.values()))
    wait_for(lambda: redis.llen(queue) == 0, 60, "the worker to drain the hostile entries")
    job = client.submit_corpus(str(corpus), str(data / "out"), model=model, id_column="id", shard_rows=100)
    manifest = job.wait(timeout=120)
    assert manifest.status == "complete" and manifest.rows_written == 400
    log = worker.log()
    assert log.count("refusing shard message") == 3, log[-3000:]
    assert "outside the worker's storage roots" in log and "contains '..'" in log and "the job has 2 shards" in log
    assert "discarded" in log and "consumer stopped" not in log
    assert worker.proc.poll() is None
    assert not (tmp_path / "x").exists() and not (tmp_path / "escape").exists()
    assert not list((data / "finished").glob("part-00099*")) and count_markers(data / "finished") == 2
    assert (data / "finished" / "_manifest.json").read_bytes() == manifest_before


def test_a_worker_refuses_to_start_without_a_storage_root(redis_broker: PersistentRedis) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "EMBEDFLEET_STORAGE_ROOTS"}
    done = subprocess.run([EMBEDFLEET, "worker", "--broker", redis_broker.url], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2
    assert "--storage-root" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
