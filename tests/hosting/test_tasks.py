"""The tasks: an inline refusal is an error code in the result, a shard is parked only on bad data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.broker import INLINE_TASK, MEMORY_BROKER
from producer.client import Client, decode_f32
from producer.errors import JobFailed, SourceError
from producer.jobs import EmbedJob, InlineResult, JobKind, Options, RerankJob
from tests.fixtures_extra import make_engine, sample_texts
from worker import sinks
from worker.hosting import poison, registry, tasks
from worker.hosting.app import create_app
from worker.hosting.host import InProcessWorker, WorkerSpec


@pytest.fixture
def hosted(tiny_embed_model: Path) -> Iterator[Any]:
    """A worker app whose registry hosts the tiny model as "tiny-bert" (no consumer: tasks run eagerly)."""
    app = create_app(MEMORY_BROKER)
    registry.of(app).register(make_engine(tiny_embed_model), "tiny-bert")
    yield app
    for engine in registry.of(app).unregister_all():
        engine.stop()


def _inline(app: Any, job: Any) -> InlineResult:
    payload = job if isinstance(job, dict) else job.model_dump(mode="json")
    return InlineResult.model_validate(app.tasks[INLINE_TASK].apply(args=[payload]).get(disable_sync_subtasks=False))


def test_inline_answers_and_refusals(hosted: Any) -> None:
    ok = _inline(hosted, EmbedJob(model="tiny-bert", inputs=["a text", "another"]))
    assert ok.error is None and decode_f32(ok.data_b64, ok.n_items, ok.dims).shape == (2, 32)
    cases = [
        (EmbedJob(model="tiny-bert", inputs=["a"], options=Options(dimensions=64)), "bad_input", "dimensions=64"),
        (EmbedJob(model="tiny-bert", inputs=["a"], options=Options(prompt_name="nope")), "bad_input", "nope"),
        (RerankJob(model="tiny-bert", query="q", documents=["d"]), "bad_input", "is an embed model"),  # the grammar the issue asks for
        (EmbedJob(model="not-hosted", inputs=["a"]), "model_not_served", "not hosted by this worker"),
        ({"kind": "embed", "model": "tiny-bert", "inputs": "not a list"}, "bad_input", "not valid"),
    ]
    for job, code, words in cases:
        result = _inline(hosted, job)
        assert result.error is not None and result.error["code"] == code, (job, result.error)
        assert words in result.error["message"], result.error


@pytest.mark.parametrize("kind", ["embed", "classify"])
def test_a_dense_answer_is_exactly_what_the_inline_result_model_writes(kind: str) -> None:
    """``inline_answer`` writes dense answers without the model: the same JSON, field for field
    and type for type (a field added to InlineResult, or one written differently, fails here)."""
    import numpy as np

    from producer.jobs import ClassifyJob
    from worker.engine.pipeline import EngineResult

    values = np.arange(3 * 4, dtype=np.float32).reshape(3, 4) / 7
    result = EngineResult(kind=JobKind(kind), values=values, n_tokens=list(np.array([5, 0, 9])),
                          truncated=[False, False, True], errors={1: "an empty text"},
                          labels=("neg", "pos") if kind == "classify" else ())
    job = ClassifyJob(model="m", inputs=["a", "", "c"]) if kind == "classify" else EmbedJob(model="m", inputs=["a", "", "c"])
    want = InlineResult(kind=JobKind(kind), model="m", n_items=3, dims=4, data_b64=tasks.encode_f32(values),
                        n_tokens=[5, 0, 9], truncated=[False, False, True], labels=list(result.labels),
                        errors={1: "an empty text"}).model_dump(mode="json")
    got = tasks.inline_answer(job, 3, result)
    assert orjson.dumps(got) == orjson.dumps(want)
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
    got["tokens"].append("x")  # answers share no mutable default with each other
    assert tasks.inline_answer(job, 3, result)["tokens"] == []


def _corpus(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": sample_texts(n)}), path)
    return path


def _run_job(model: Path, corpus: Path, out: Path, timeout: float = 120) -> Any:
    spec = WorkerSpec(models=[str(model)], device="cpu", backend="torch", dtype="float32", concurrency=1)
    with InProcessWorker(spec) as worker:
        handle = Client(app=worker.app).submit_corpus(str(corpus), str(out), model=str(model), id_column="id",
                                                      shard_rows=10)
        return handle.wait(timeout=timeout, raise_on_failure=False)


def test_a_bug_is_retried_not_taken_for_bad_data(tiny_embed_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = tasks.read_shard
    calls: list[int] = []

    def flaky(shard: Any, kind: Any, columns: Any) -> Any:
        calls.append(shard.index)
        if shard.index == 1 and calls.count(1) == 1:
            raise KeyError("a bug of ours, once")  # parked at once before: KeyError counted as bad data
        return real(shard, kind, columns)

    monkeypatch.setattr(tasks, "read_shard", flaky)
    manifest = _run_job(tiny_embed_model, _corpus(tmp_path / "c.parquet", 20), tmp_path / "out")
    assert manifest.status == "complete" and manifest.rows_written == 20
    assert calls.count(1) == 2


def test_bad_data_is_parked_at_once(tiny_embed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tasks.read_shard
    calls: list[int] = []

    def corrupt(shard: Any, kind: Any, columns: Any) -> Any:
        calls.append(shard.index)
        if shard.index == 0:
            raise SourceError("c.parquet: row group 0 is corrupt")
        return real(shard, kind, columns)

    monkeypatch.setattr(tasks, "read_shard", corrupt)
    manifest = _run_job(tiny_embed_model, _corpus(tmp_path / "c.parquet", 20), tmp_path / "out")
    assert manifest.status == "partial" and manifest.rows_written == 10
    (failed,) = manifest.failed_shards
    assert failed.index == 0 and "row group 0 is corrupt" in (failed.failure or "") and failed.deliveries == 1
    assert calls.count(0) == 1  # never retried


def test_a_failure_whose_reason_cannot_be_noted_is_still_retried(tiny_embed_model: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Noting why a delivery failed talks to the broker's Redis, which may be away for a moment.
    Before, that error escaped the task, which Celery then acknowledged: the shard was gone (on
    Redis until a sweep found it lost; in memory for good, and the job never ended)."""
    real = tasks.read_shard
    calls: list[int] = []

    def flaky(shard: Any, kind: Any, columns: Any) -> Any:
        calls.append(shard.index)
        if shard.index == 1 and calls.count(1) == 1:
            raise KeyError("a bug of ours, once")
        return real(shard, kind, columns)

    def unreachable(self: Any, task_id: str, reason: str) -> None:
        raise ConnectionError("the broker's Redis is away")

    monkeypatch.setattr(tasks, "read_shard", flaky)
    monkeypatch.setattr(poison.LocalDeliveries, "note_failure", unreachable)
    manifest = _run_job(tiny_embed_model, _corpus(tmp_path / "c.parquet", 20), tmp_path / "out", timeout=30)
    assert manifest.status == "complete" and manifest.rows_written == 20
    assert calls.count(1) == 2


def test_a_manifest_that_could_not_be_written_is_written_by_the_next_delivery(
        tiny_embed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard is parked (bad data) and its failure marker written, but the manifest's write
    fails once (storage away for a moment). Before, the next delivery found the marker, skipped
    the shard and wrote no manifest: every shard had its marker and the job never ended."""
    real_read, real_finalize = tasks.read_shard, sinks.finalize_if_complete
    finalizes: list[str] = []

    def corrupt(shard: Any, kind: Any, columns: Any) -> Any:
        if shard.index == 1:
            raise SourceError("c.parquet: row group 1 is corrupt")
        return real_read(shard, kind, columns)

    def flaky(out: str, revision: Any) -> Any:
        finalizes.append(out)
        if len(finalizes) == 2:  # the second shard's (the last): its marker is written, then this
            raise OSError(5, "Input/output error")
        return real_finalize(out, revision)

    monkeypatch.setattr(tasks, "read_shard", corrupt)
    monkeypatch.setattr(sinks, "finalize_if_complete", flaky)
    manifest = _run_job(tiny_embed_model, _corpus(tmp_path / "c.parquet", 20), tmp_path / "out", timeout=30)
    assert manifest.status == "partial" and [s.index for s in manifest.failed_shards] == [1]
    assert len(finalizes) == 3


def test_a_failure_s3_refuses_to_record_is_recorded_beside_the_queue_not_lost(
        tiny_embed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's S3 bucket is gone once its shards are queued (moto's S3 over HTTP answers
    NoSuchBucket: botocore's ClientError, no OSError), on the in-memory broker: every delivery fails
    to write its part, and on the last one the failure marker that would park the shard fails too.
    Before, that error escaped ``park``, Celery acknowledged the message, and with no sweeper off
    Redis the shard was lost: the job never ended. Now it is recorded beside the queue and the job
    ends failed, naming the error."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("EMBEDFLEET_MAX_DELIVERIES", "2")
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="gone")
        spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                          concurrency=1)
        worker = InProcessWorker(spec)
        handle = Client(app=worker.app).submit_corpus(str(_corpus(tmp_path / "c.parquet", 10)), "s3://gone/job",
                                                      model=str(tiny_embed_model), id_column="id", shard_rows=10)
        for listed in s3.list_objects_v2(Bucket="gone").get("Contents", []):
            s3.delete_object(Bucket="gone", Key=listed["Key"])
        s3.delete_bucket(Bucket="gone")
        with worker:
            with pytest.raises(JobFailed, match=r"1 shard\(s\) could not be written .*NoSuchBucket"):
                handle.wait(timeout=60, poll=0.1)
        assert "failed on all 2 deliveries" in handle.unwritten()[0]
    finally:
        server.stop()
