"""Signed shard messages: a worker holding EMBEDFLEET_SIGNING_KEY refuses unsigned or altered ones."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.client import Client
from producer.jobs import ShardJob
from producer.signing import refusal, sign
from worker.hosting.tasks import untrusted


def _payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A shard message exactly as ``submit_corpus`` sends it (captured at ``send_task``)."""
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), corpus)
    client = Client()
    sent: list[dict] = []
    monkeypatch.setattr(client.app, "send_task", lambda name, args, **kw: sent.append(args[0]))
    client.submit_corpus(str(corpus), str(tmp_path / "out"), model="tiny", id_column="id")
    (payload,) = sent
    return payload


def test_signed_messages_pass_and_unsigned_or_altered_ones_are_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_SIGNING_KEY", "s3cret")
    payload = _payload(tmp_path, monkeypatch)
    assert len(payload["signature"]) == 64 and refusal(payload) is None
    job = ShardJob.model_validate(payload)
    assert untrusted(job, payload, None) is None  # no storage roots: only the signature is checked
    unsigned = {**payload, "signature": None}
    assert "unsigned" in untrusted(ShardJob.model_validate(unsigned), unsigned, None)
    altered = {**payload, "shard": {**payload["shard"], "uri": "/etc/passwd"}}
    assert "does not match" in untrusted(ShardJob.model_validate(altered), altered, None)
    monkeypatch.setenv("EMBEDFLEET_SIGNING_KEY", "another")
    assert "does not match" in refusal(payload)


def test_without_a_key_nothing_is_signed_or_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDFLEET_SIGNING_KEY", raising=False)
    payload = _payload(tmp_path, monkeypatch)
    # unsigned messages carry no signature field at all: workers from before signing forbid unknown fields
    assert "signature" not in payload and refusal(payload) is None and sign(payload) == payload
