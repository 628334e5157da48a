"""The fleet on a real Redis: two worker processes, SIGKILLs, a Redis restart, a poison shard,
a resubmission, and SIGTERM at any moment. Every check reads the real Parquet output. Inline
calls: answered across a worker's stop, and not queued behind bulk shards."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from producer.broker import INLINE_TASK, SHARD_TASK
from producer.client import Client, JobHandle, decode_f32, plan_corpus
from producer.jobs import EmbedJob, InlineResult, ShardJob, inline_queue_name, queue_name
from .conftest import (
    EMBEDFLEET,
    PersistentRedis,
    WorkerProcess,
    count_markers,
    make_corpus,
    reference_vectors,
    wait_for,
)

FAST_REDELIVERY = {"EMBEDFLEET_VISIBILITY_TIMEOUT": "4", "EMBEDFLEET_SWEEP_INTERVAL": "3"}
#: The default visibility timeout (an hour): a dead worker's shards come back through liveness alone.
FAST_LIVENESS = {"EMBEDFLEET_LIVENESS_TTL": "3"}


def read_output(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    return table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))]


def assert_exactly_once(out: Path, corpus: Path, model: Path) -> float:
    """Every input id once, vectors equal to the bare engine's; returns the largest difference."""
    source = pq.read_table(corpus)
    ids, vectors = read_output(out)
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(source.column("id").to_pylist()), "ids lost or invented"
    order = {id_: i for i, id_ in enumerate(ids)}
    got = vectors[[order[i] for i in source.column("id").to_pylist()]]
    want = reference_vectors(model, source.column("text").to_pylist())
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    return float(np.abs(got - want).max())


def test_sigkill_workers_mid_job_every_row_exactly_once(tmp_path: Path, redis_broker: PersistentRedis,
                                                         workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 4000)
    env = {**FAST_LIVENESS, "EMBEDFLEET_MAX_DELIVERIES": "10"}
    for name in ("a", "b"):
        workers.append(WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / f"worker-{name}.log", env).start())
    for worker in workers:
        worker.wait_ready()
    out = tmp_path / "out"
    handle = Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                           id_column="id", shard_rows=100)
    assert handle.enqueued == handle.n_shards == 40
    kills = 0
    for threshold in (4, 10, 16):
        wait_for(lambda: count_markers(out) >= threshold, 120, f"{threshold} shards done")
        victim = workers[kills % 2]
        victim.kill(signal.SIGKILL)  # no cleanup at all, like a machine that dies
        kills += 1
        victim.start()
    manifest = handle.wait(timeout=60)  # an hour with the visibility timeout alone
    assert kills == 3
    assert manifest.status == "complete" and manifest.rows_written == 4000
    assert (out / "_SUCCESS").exists()
    redelivered = sum(m["deliveries"] > 1 for m in markers(out))
    assert redelivered, "no kill hit a shard in flight"
    diff = assert_exactly_once(out, corpus, tiny_embed_model)
    print(f"kills={kills} shards redelivered={redelivered} rows=4000 lost=0 duplicated=0 max|dv|={diff:.2e}")


def test_redis_restart_mid_job_completes(tmp_path: Path, redis_broker: PersistentRedis,
                                         workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus.parquet", 3000, seed=1)
    workers.append(WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", FAST_REDELIVERY).start())
    workers[0].wait_ready()
    out = tmp_path / "out"
    handle = Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                           id_column="id", shard_rows=100)
    wait_for(lambda: count_markers(out) >= 3, 120, "3 shards done")
    redis_broker.stop()
    time.sleep(2)  # the worker sees the broker gone
    redis_broker.start()  # same port, same append-only file
    manifest = handle.wait(timeout=180)
    assert manifest.status == "complete"
    assert count_markers(out) == handle.n_shards
    assert_exactly_once(out, corpus, tiny_embed_model)


def test_poison_shard_is_parked_and_resubmission_redoes_only_it(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], tiny_embed_model: Path
) -> None:
    """A shard that kills its worker on every delivery is parked after N; the others complete;
    the job reports it; submitting the job again redoes that shard alone."""
    corpus = make_corpus(tmp_path / "corpus.parquet", 2400, seed=2)
    model = str(tiny_embed_model)
    out = tmp_path / "out"
    spec = plan_corpus(str(corpus), str(out), model=model, id_column="id", shard_rows=600)
    client = Client(broker=redis_broker.url)
    poison_id = f"{spec.job_id}-00001-poison"
    for shard in spec.shards:  # the job's shards, as submit_corpus sends them, with known ids
        message = ShardJob(kind=spec.kind, job_id=spec.job_id, model=model, out=str(out), columns=spec.columns,
                           options=spec.options, shard=shard, n_shards=len(spec.shards))
        task_id = poison_id if shard.index == 1 else f"{spec.job_id}-{shard.index:05d}-poison"
        client.app.send_task(SHARD_TASK, args=[message.model_dump(mode="json")], task_id=task_id,
                             queue=queue_name(spec.kind, model))
    counter_key = f"embedfleet:deliveries:{poison_id}"
    redis = redis_broker.client()
    worker = WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / "worker.log",
                           {**FAST_REDELIVERY, "EMBEDFLEET_MAX_DELIVERIES": "2",
                            # one shard held at a time: a kill then costs shard 1 a delivery, and no other
                            "EMBEDFLEET_SHARD_LOOKAHEAD": "0"}, concurrency=1)
    workers.append(worker.start())
    for delivery in (1, 2):  # the "poison": whoever takes shard 1 dies, mid-shard
        wait_for(lambda: int(redis.get(counter_key) or 0) >= delivery, 120, f"delivery {delivery} of shard 1", 0.005)
        worker.kill(signal.SIGKILL)
        worker.start()
    handle = JobHandle.open(str(out))
    manifest = handle.wait(timeout=120, raise_on_failure=False)
    assert manifest.status == "partial"
    assert [s.index for s in manifest.failed_shards] == [1]
    assert "parked after 2 deliveries" in (manifest.failed_shards[0].failure or "")
    assert manifest.rows_written == 1800 and not (out / "_SUCCESS").exists()
    status = subprocess.run([EMBEDFLEET, "status", str(out)], capture_output=True, text=True)
    assert status.returncode == 1, status.stdout + status.stderr

    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(done_before) == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    again = client.submit_corpus(str(corpus), str(out), model=model, id_column="id", shard_rows=600)
    assert again.enqueued == 1  # only the parked shard
    manifest = again.wait(timeout=120)
    assert manifest.status == "complete" and manifest.rows_written == 2400
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done_before} == done_before
    assert_exactly_once(out, corpus, tiny_embed_model)
    assert client.submit_corpus(str(corpus), str(out), model=model, id_column="id", shard_rows=600).enqueued == 0


def test_sigterm_stops_at_any_moment_and_gives_work_back(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], bundled_model: Path,
    tiny_embed_model: Path
) -> None:
    # 1. during start-up (imports, model loading): it exits, cleanly, without waiting for the load
    loading = WorkerProcess(redis_broker.url, bundled_model, tmp_path / "loading.log")
    workers.append(loading.start())
    wait_for(lambda: "loading all-MiniLM-L6-v2" in loading.log(), 60, "the model load to begin", 0.01)
    loading.proc.send_signal(signal.SIGTERM)
    loading.proc.wait(30)  # raises if the worker is still there
    assert "signal 15: stopping" in loading.log()
    assert "worker ready" not in loading.log()

    # 2. mid-job: the shards in flight go back to the queue, and the stop does not count as a delivery
    corpus = make_corpus(tmp_path / "corpus.parquet", 4000, seed=3)
    worker = WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", concurrency=2)
    workers.append(worker.start())
    worker.wait_ready()
    out = tmp_path / "out"
    handle = Client(broker=redis_broker.url).submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                           id_column="id", shard_rows=1000)
    redis = redis_broker.client()
    wait_for(lambda: redis.keys("embedfleet:deliveries:*"), 60, "a shard in flight", 0.01)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert count_markers(out) < handle.n_shards
    queued = redis.llen(queue_name("embed", str(tiny_embed_model))) + redis.hlen("unacked")
    assert queued == handle.n_shards - count_markers(out), "a shard was lost by the stop"
    worker.start().wait_ready()
    manifest = handle.wait(timeout=120)
    assert manifest.status == "complete"
    assert all(m["deliveries"] == 1 for m in markers(out)), "a graceful stop was counted as a delivery"
    assert_exactly_once(out, corpus, tiny_embed_model)


def test_a_message_lost_by_redis_is_sent_again(tmp_path: Path, redis_broker: PersistentRedis,
                                               workers: list[WorkerProcess], tiny_embed_model: Path) -> None:
    """kombu pops before it records a delivery: a worker killed in between loses the message.
    Here the message is popped by hand, and the workers' sweeper must send it again."""
    corpus = make_corpus(tmp_path / "corpus.parquet", 600, seed=4)
    out = tmp_path / "out"
    submitted = subprocess.run(
        [EMBEDFLEET, "submit", str(corpus), "--out", str(out), "--broker", redis_broker.url,
         "--model", str(tiny_embed_model), "--id-column", "id", "--shard-rows", "200"],
        capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]  # the job id is printed last
    handle = JobHandle.open(str(out))
    assert job_id == handle.job_id
    redis = redis_broker.client()
    queue = queue_name("embed", str(tiny_embed_model))
    assert redis.llen(queue) == 3
    lost = json.loads(redis.rpop(queue))
    assert lost["headers"]["task"] == SHARD_TASK
    workers.append(WorkerProcess(redis_broker.url, tiny_embed_model, tmp_path / "worker.log", FAST_REDELIVERY).start())
    status = subprocess.run([EMBEDFLEET, "status", job_id, "--broker", redis_broker.url, "--wait"],
                            capture_output=True, text=True, timeout=180)
    assert status.returncode == 0, status.stdout + status.stderr
    manifest = handle.wait(timeout=10)
    assert manifest.status == "complete" and manifest.rows_written == 600
    assert "sending it again" in workers[0].log()
    assert_exactly_once(out, corpus, tiny_embed_model)


# ---------------------------------------------------------------------------- inline calls
TORCH = {"EMBEDFLEET_BACKEND": "torch"}  # skip the start-up backend measurement: these tests time nothing


def test_an_inline_call_caught_by_a_stop_is_answered_by_another_worker(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], bundled_model: Path
) -> None:
    """Inline queues keep no unacknowledged copy, so the stopping worker sends the call again
    (same id) and the caller still gets its answer, from the next worker."""
    first = WorkerProcess(redis_broker.url, bundled_model, tmp_path / "first.log", TORCH)
    workers.append(first.start())
    first.wait_ready()
    texts = pq.read_table(make_corpus(tmp_path / "texts.parquet", 800, seed=5)).column("text").to_pylist()
    client = Client(broker=redis_broker.url)
    queue = inline_queue_name("embed", str(bundled_model))
    job = EmbedJob(model=str(bundled_model), inputs=texts).model_dump(mode="json")
    pending = client.app.send_task(INLINE_TASK, args=[job], queue=queue)
    redis = redis_broker.client()
    wait_for(lambda: redis.llen(queue) == 0, 60, "the first worker to take the call", 0.01)
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    assert "was caught by the worker's stop" in first.log()
    second = WorkerProcess(redis_broker.url, bundled_model, tmp_path / "second.log", TORCH)
    workers.append(second.start())
    result = InlineResult.model_validate(pending.get(timeout=300, disable_sync_subtasks=False))
    assert result.n_items == len(texts) and not result.errors
    assert np.isfinite(decode_f32(result.data_b64, result.n_items, result.dims)).all()


def test_an_inline_call_is_answered_while_every_slot_runs_a_shard(
    tmp_path: Path, redis_broker: PersistentRedis, workers: list[WorkerProcess], bundled_model: Path
) -> None:
    """One shard slot, busy with a 1,200-text shard, and a second shard queued: the call is read
    on the inline lane's own channel, runs on a pool thread shards never fill, and its text goes
    into the engine's next batch ahead of the shard's pending texts. So it is answered while the
    shard still runs; on one shared lane it would wait for the shard to finish."""
    # one shard slot and no read-ahead: the second shard stays queued while the first runs
    worker = WorkerProcess(redis_broker.url, bundled_model, tmp_path / "worker.log",
                           {**TORCH, "EMBEDFLEET_SHARD_LOOKAHEAD": "0"}, concurrency=1)
    workers.append(worker.start())
    worker.wait_ready()
    corpus = make_corpus(tmp_path / "corpus.parquet", 1300, seed=6)
    out = tmp_path / "out"
    client = Client(broker=redis_broker.url)
    handle = client.submit_corpus(str(corpus), str(out), model=str(bundled_model), id_column="id",
                                  shard_rows=1200)
    shards = queue_name("embed", str(bundled_model))
    redis = redis_broker.client()
    wait_for(lambda: redis.llen(shards) == 1, 60, "the worker to take the first shard", 0.01)
    vector = client.embed("an interactive call", model=str(bundled_model), timeout=300)
    assert vector.shape == (384,)
    assert count_markers(out) == 0, "the call waited for the running shard to finish"
    assert redis.llen(shards) == 1, "the second shard was taken: the slot was not busy after all"
    manifest = handle.wait(timeout=300)
    assert manifest.status == "complete" and manifest.rows_written == 1300
