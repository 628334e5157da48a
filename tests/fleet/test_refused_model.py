"""A fleet worker asked to host a model it cannot serve faithfully, on a real Redis.

The worker refuses the model (it is never half-loaded) but keeps consuming its queues, so a job
for it does not wait forever for a worker that will never come: each shard is failed at its first
delivery with the refusal as the reason (a permanent error, not a poison shard retried up to
EMBEDFLEET_MAX_DELIVERIES), an inline call is answered with the ``unsupported_model`` error, and
what the worker reports to the facade (/v1/models) says the model is refused and why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.broker import MODELS_COMMAND
from producer.client import Client
from producer.errors import UnsupportedModel

from tests.families import save_jina
from tests.fleet.conftest import PersistentRedis, WorkerProcess, make_corpus

pytestmark = pytest.mark.timeout(300)

MISSING = "encoder.layer.1.mlp.gated_layers.weight"


def test_a_refused_models_shards_fail_at_once_with_the_reason(tmp_path: Path, redis_broker: PersistentRedis,
                                                              workers: list[WorkerProcess]) -> None:
    folder = save_jina(tmp_path / "jina-incomplete", drop=[MISSING])
    worker = WorkerProcess(redis_broker.url, folder, tmp_path / "worker.log", {"EMBEDFLEET_MAX_DELIVERIES": "3"},
                           concurrency=1)
    workers.append(worker.start())
    worker.wait_ready()
    assert "refused (their jobs fail with the reason)" in " ".join(worker.log().split())
    client = Client(broker=redis_broker.url)

    with pytest.raises(UnsupportedModel, match=MISSING.replace(".", r"\.")):
        client.embed(["a text"], model=str(folder), timeout=60)

    corpus = make_corpus(tmp_path / "corpus.parquet", 90, seed=4)
    handle = client.submit_corpus(str(corpus), str(tmp_path / "out"), model=str(folder), id_column="id",
                                  shard_rows=30)
    manifest = handle.wait(timeout=120, raise_on_failure=False)
    assert [s.index for s in manifest.failed_shards] == [0, 1, 2] and manifest.rows_written == 0
    for shard in manifest.failed_shards:
        assert shard.deliveries == 1, "a refusal is permanent: failed at the first delivery, never retried"
        assert "UnsupportedModel" in (shard.failure or "") and MISSING in (shard.failure or "")
        assert "parked after" not in (shard.failure or "")

    replies = client.app.control.broadcast(MODELS_COMMAND, reply=True, timeout=5.0)
    reported = [m for reply in replies for answer in reply.values() for m in answer["models"]]
    assert len(reported) == 1 and reported[0]["faithful"] is False
    assert MISSING in reported[0]["refusal"] and reported[0]["family"] == "jina-bert-v2"
