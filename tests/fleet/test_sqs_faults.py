"""Faults on SQS (moto's ThreadedMotoServer over HTTP, kombu's SQS transport unchanged): workers
SIGKILLed mid-job, a shard that can neither finish nor be parked reaching the dead-letter queue
through the redrive policy, and garbage on the queue next to a real job."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from producer.broker import sqs_name
from producer.client import Client
from producer.errors import JobFailed
from producer.jobs import queue_name

from .conftest import EMBEDFLEET, PersistentRedis, WorkerProcess, count_markers, make_corpus, wait_for
from .test_redis_fleet import assert_exactly_once, markers
from .test_sqs_fleet import aws  # noqa: F401  (the moto fixture)

#: SQS gives an unacknowledged message back after this long: a killed worker's shards return quickly.
FAST = {"EMBEDFLEET_VISIBILITY_TIMEOUT": "4", "EMBEDFLEET_BACKEND": "torch"}


def _sqs_worker(tmp_path: Path, name: str, model: Path, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess("sqs://", model, tmp_path / f"worker-{name}.log", env)


def unwritable(folder: Path, request: pytest.FixtureRequest) -> None:
    """Make ``folder`` refuse new files while it still lists and reads: read-only for a normal
    user; immutable (``chattr +i``) for root, who ignores permissions; else skip."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i (CAP_LINUX_IMMUTABLE): no way to make a folder unwritable")
    request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(folder)], check=False))


def test_sigkill_storm_on_sqs_every_row_once(tmp_path: Path, aws: dict[str, str],  # noqa: F811
                                             redis_broker: PersistentRedis, workers: list[WorkerProcess],
                                             tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EMBEDFLEET_RESULT_BACKEND", redis_broker.url)
    env = {**aws, **FAST, "EMBEDFLEET_MAX_DELIVERIES": "10", "EMBEDFLEET_RESULT_BACKEND": redis_broker.url}
    for name in ("a", "b"):
        workers.append(_sqs_worker(tmp_path, name, tiny_embed_model, env).start())
    for worker in workers:
        worker.wait_ready()
    corpus = make_corpus(tmp_path / "corpus.parquet", 4000, seed=9)
    out = tmp_path / "out"
    handle = Client(broker="sqs://").submit_corpus(str(corpus), str(out), model=str(tiny_embed_model),
                                                   id_column="id", shard_rows=100)
    assert handle.n_shards == 40
    kills = 0
    for threshold in (4, 12):  # each worker once (a restart takes ~15-30 s on 2 shared cores)
        wait_for(lambda: count_markers(out) >= threshold, 120, f"{threshold} shards done")
        victim = workers[kills % 2]
        victim.kill(signal.SIGKILL)
        kills += 1
        victim.start()
    manifest = handle.wait(timeout=120)
    assert manifest.status == "complete" and manifest.rows_written == 4000
    redelivered = sum(m["deliveries"] > 1 for m in markers(out))
    diff = assert_exactly_once(out, corpus, tiny_embed_model)
    print(f"sqs kills={kills} shards received again={redelivered} rows=4000 once each max|dv|={diff:.2e}")


def test_a_shard_that_cannot_be_parked_reaches_the_dead_letter_queue(
    tmp_path: Path, aws: dict[str, str], redis_broker: PersistentRedis,  # noqa: F811
    workers: list[WorkerProcess], tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest
) -> None:
    """Every delivery fails to write its done-marker (the output's ``_parts`` folder is
    unwritable), and so does the failure marker that would park it. Acknowledged, the message would vanish; left unacknowledged, SQS's redrive policy moves it
    to the dead-letter queue after ``maxReceiveCount`` (``EMBEDFLEET_MAX_DELIVERIES`` + 1) receives.
    Meanwhile garbage on the same queue is discarded, not sent there."""
    import boto3

    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EMBEDFLEET_RESULT_BACKEND", redis_broker.url)
    corpus = make_corpus(tmp_path / "corpus.parquet", 100, seed=10)
    out = tmp_path / "out"
    client = Client(broker="sqs://")
    handle = client.submit_corpus(str(corpus), str(out), model=str(tiny_embed_model), id_column="id",
                                  shard_rows=100)
    unwritable(out / "_parts", request)
    sqs = boto3.client("sqs")
    name = sqs_name(queue_name("embed", str(tiny_embed_model)))
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=name + "-dlq")["QueueUrl"]
    for body in ("not json", "[1, 2]", '{"body": "no properties"}'):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    env = {**aws, **FAST, "EMBEDFLEET_RESULT_BACKEND": redis_broker.url}  # EMBEDFLEET_MAX_DELIVERIES=2 (aws)
    worker = _sqs_worker(tmp_path, "a", tiny_embed_model, env)
    workers.append(worker.start())
    worker.wait_ready()

    def dead_letters() -> list[dict]:
        got = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=1,
                                  AttributeNames=["All"])
        return got.get("Messages", [])

    landed = wait_for(dead_letters, 120, "the shard in the dead-letter queue", poll=1.0)
    assert len(landed) == 1, [m["Body"][:80] for m in landed]
    envelope = json.loads(base64.b64decode(landed[0]["Body"]))  # kombu's SQS bodies are base64
    assert envelope["headers"]["id"].startswith(handle.job_id)  # the shard, not the garbage
    left = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert left["ApproximateNumberOfMessages"] == left["ApproximateNumberOfMessagesNotVisible"] == "0"
    log = worker.log()
    assert "leaving the message to the dead-letter queue" in log
    assert "undecodable message(s)" in log
    assert not (out / "_manifest.json").exists()
    # the job ends, failed, naming where the shard went (instead of waiting for a marker forever)
    with pytest.raises(JobFailed, match=r"1 shard\(s\) could not be written .*shard 0: its message is in the "
                                        r"dead-letter queue " + re.escape(name + "-dlq")):
        handle.wait(timeout=60, raise_on_failure=False)
    status = subprocess.run([EMBEDFLEET, "status", str(out), "--broker", "sqs://"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **env})
    assert status.returncode == 1 and "dead-letter queue" in status.stdout + status.stderr, status
    print(f"dead-lettered after {landed[0].get('Attributes', {}).get('ApproximateReceiveCount', '?')} receives "
          f"in the DLQ; garbage discarded")
