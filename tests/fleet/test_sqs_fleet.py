"""The fleet on SQS and S3, through moto's ThreadedMotoServer over HTTP: kombu's SQS transport
(pycurl), boto3 and pyarrow's S3 filesystem run unchanged against it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from producer import storage
from producer.broker import SHARD_TASK, declare_queue, sqs_name
from producer.client import Client, JobHandle, plan_corpus
from producer.jobs import ShardJob, queue_name

from .conftest import PersistentRedis, WorkerProcess, free_port, make_corpus, reference_vectors

BUCKET = "embedfleet-test"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its backends in process-wide state that outlives a server: queues an earlier test of
    # this process declared (with its own EMBEDFLEET_MAX_DELIVERIES) would still be there
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "EMBEDFLEET_SQS_WAIT": "1",
           "EMBEDFLEET_MAX_DELIVERIES": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def test_sqs_and_s3_bulk_inline_and_poison(tmp_path: Path, aws: dict[str, str], redis_broker: PersistentRedis,
                                           workers: list[WorkerProcess], tiny_embed_model: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("EMBEDFLEET_RESULT_BACKEND", redis_broker.url)
    model = str(tiny_embed_model)
    local = make_corpus(tmp_path / "corpus.parquet", 900, seed=5)
    boto3.client("s3").upload_file(str(local), BUCKET, "in/corpus.parquet")
    source = f"s3://{BUCKET}/in/corpus.parquet"
    client = Client(broker="sqs://")

    # A poison shard, by SQS's own count: received twice (as if two workers died on it) before
    # any worker runs, it is parked on its next receive; the job's other shard completes.
    poisoned_out = f"s3://{BUCKET}/poisoned"
    spec = plan_corpus(source, poisoned_out, model=model, id_column="id", shard_rows=450)
    messages = [ShardJob(kind=spec.kind, job_id=spec.job_id, model=model, out=poisoned_out, columns=spec.columns,
                         options=spec.options, shard=s, n_shards=2).model_dump(mode="json") for s in spec.shards]
    queue = queue_name(spec.kind, model)
    declare_queue(client.app, queue)  # what submit_corpus does: the queue and its DLQ
    client.app.send_task(SHARD_TASK, args=[messages[1]], queue=queue, task_id=f"{spec.job_id}-00001-x")
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=sqs_name(queue))["QueueUrl"]
    for _ in range(2):
        got = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=1)
        assert len(got["Messages"]) == 1
    client.app.send_task(SHARD_TASK, args=[messages[0]], queue=queue, task_id=f"{spec.job_id}-00000-x")

    env = {**aws, "EMBEDFLEET_RESULT_BACKEND": redis_broker.url}
    worker = WorkerProcess("sqs://", tiny_embed_model, tmp_path / "worker.log", env)
    worker.args += ["--storage-root", f"s3://{BUCKET}/"]  # its sources and outputs are in the bucket
    workers.append(worker.start())
    workers[0].wait_ready()

    # the queue was created with a dead-letter queue and a redrive policy
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    policy = json.loads(attributes["RedrivePolicy"])
    assert policy["deadLetterTargetArn"].endswith(":" + sqs_name(queue) + "-dlq")
    assert int(policy["maxReceiveCount"]) == 3

    parked = JobHandle.open(poisoned_out).wait(timeout=120, raise_on_failure=False)
    assert parked.status == "partial" and [s.index for s in parked.failed_shards] == [1]
    assert "parked after 2 deliveries" in (parked.failed_shards[0].failure or "")
    assert parked.rows_written == 450

    # inline call: results through the result backend as base64 float32
    texts = pq.read_table(local).column("text").to_pylist()
    vectors = client.embed(texts[:5], model=model, timeout=60)
    np.testing.assert_allclose(vectors, reference_vectors(tiny_embed_model, texts[:5]), atol=2e-5)

    # bulk: S3 in, S3 out, manifest last, every id once
    out = f"s3://{BUCKET}/vectors"
    handle = client.submit_corpus(source, out, model=model, id_column="id", shard_rows=300)
    manifest = handle.wait(timeout=120)
    assert manifest.status == "complete" and manifest.rows_written == 900
    assert storage.exists(storage.locate(out).child("_SUCCESS"))
    table = handle.read()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) == sorted(pq.read_table(local).column("id").to_pylist())
    order = {id_: i for i, id_ in enumerate(ids)}
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    want = reference_vectors(tiny_embed_model, texts)
    np.testing.assert_allclose(got[[order[f"doc-{i:06d}"] for i in range(900)]], want, atol=2e-5)
    assert client.submit_corpus(source, out, model=model, id_column="id", shard_rows=300).enqueued == 0
