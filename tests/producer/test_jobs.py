"""The wire contract: validation errors name the field and the limit; names are deterministic."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from producer.rules import MAX_INLINE_INPUTS
from producer.jobs import (
    SCHEMA_VERSION,
    ClassifyJob,
    Columns,
    EmbedJob,
    JobKind,
    JobManifest,
    Options,
    RerankJob,
    RowError,
    ShardJob,
    ShardRef,
    marker_name,
    model_slug,
    part_name,
    queue_name,
    stable_job_id,
)


def test_options_defaults_mean_model_defaults() -> None:
    options = Options()
    assert options.normalize is None and options.dimensions is None and options.prompt_name is None
    assert options.truncate is True and options.output_dtype == "float32" and options.raw_scores is False


def test_options_prompt_and_prompt_name_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="either prompt or prompt_name"):
        Options(prompt="q: ", prompt_name="query")


@pytest.mark.parametrize("bad", [{"dimensions": 0}, {"output_dtype": "int8"}, {"unknown": 1}])
def test_options_reject_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError) as info:
        Options(**bad)
    assert next(iter(bad)) in str(info.value)


def test_inline_inputs_bounded_with_the_limit_named() -> None:
    with pytest.raises(ValidationError, match="inputs: the list is empty"):
        EmbedJob(model="m", inputs=[])
    with pytest.raises(ValidationError, match=f"exceed the limit of {MAX_INLINE_INPUTS}"):
        EmbedJob(model="m", inputs=["x"] * (MAX_INLINE_INPUTS + 1))
    with pytest.raises(ValidationError, match="documents: the list is empty"):
        RerankJob(model="m", query="q", documents=[])
    EmbedJob(model="m", inputs=["x"] * MAX_INLINE_INPUTS)  # exactly at the limit is fine


def test_inline_inputs_keep_bad_items_for_per_item_errors() -> None:
    job = ClassifyJob(model="m", inputs=["ok", 3, None, ""])
    assert job.inputs == ["ok", 3, None, ""]


def test_newer_schema_version_is_refused() -> None:
    with pytest.raises(ValidationError, match=f"newer than this code understands \\({SCHEMA_VERSION}\\)"):
        EmbedJob(model="m", inputs=["x"], schema_version=SCHEMA_VERSION + 1)


def test_messages_round_trip_through_json() -> None:
    shard = ShardRef(index=3, uri="s3://b/k.parquet", format="parquet", row_start=10, row_stop=25)
    job = ShardJob(kind=JobKind.embed, job_id="abc", model="m", out="/o", columns=Columns(id="id"),
                   options=Options(dimensions=8, output_dtype="float16"), shard=shard, n_shards=4)
    wire = json.dumps(job.model_dump(mode="json"))
    back = ShardJob.model_validate(json.loads(wire))
    assert back == job and back.shard.n_rows == 15
    with pytest.raises(ValidationError):
        ShardJob.model_validate({**json.loads(wire), "extra_field": 1})


def test_manifest_round_trip() -> None:
    manifest = JobManifest(job_id="j", kind=JobKind.embed, model="m", source="s", out="o", n_rows=3,
                           rows_written=2, n_tokens=9, parts=[part_name(0)],
                           errors=[RowError(row=1, id="b", field="text", reason="empty")], status="complete")
    assert JobManifest.model_validate_json(manifest.model_dump_json()) == manifest


@pytest.mark.parametrize(
    ("model", "slug"),
    [("/models/bge-small/", "bge-small"), ("BAAI/bge-small-en-v1.5", "bge-small-en-v1-5"),
     ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"), ("C:\\m\\e5 base", "e5-base"), ("///", "model")],
)
def test_model_slug_and_queue_name(model: str, slug: str) -> None:
    assert model_slug(model) == slug
    assert queue_name(JobKind.rerank, model) == f"rerank.{slug}"
    assert queue_name("embed", model) == f"embed.{slug}"


def test_stable_job_id_depends_only_on_content() -> None:
    a = stable_job_id({"x": 1, "y": [1, 2]})
    assert a == stable_job_id({"y": [1, 2], "x": 1}) and len(a) == 16
    assert a != stable_job_id({"x": 2, "y": [1, 2]})


def test_layout_names() -> None:
    assert part_name(0) == "part-00000.parquet" and part_name(123) == "part-00123.parquet"
    assert marker_name(7) == "part-00007.json"


def test_messages_leave_fields_at_their_default_out_for_older_workers() -> None:
    """Workers forbid unknown fields: a message that uses no newer option must not carry it, so the
    workers of before it (a rolling upgrade) still read it; the worker reads the defaults back in."""
    from producer.jobs import Columns, EmbedJob, Options, RerankJob, ShardJob, ShardRef, wire

    shard = ShardJob(kind="embed", job_id="j", model="m", out="/o", columns=Columns(text="t"),
                     shard=ShardRef(uri="/c.parquet", index=0, format="parquet", row_start=0, row_stop=10),
                     n_shards=1)
    payload = wire(shard)
    for newer in ("signature", "schema_version"):
        assert newer not in payload
    assert "image" not in payload["columns"] and "options" not in payload
    assert ShardJob.model_validate(payload) == shard
    asked = ShardJob(**{**shard.model_dump(), "options": Options(outputs=["dense", "sparse"])})
    assert wire(asked)["options"]["outputs"] == ["dense", "sparse"]
    inline = EmbedJob(model="m", inputs=["a"])
    assert set(wire(inline)) == {"kind", "model", "inputs"} and EmbedJob.model_validate(wire(inline)) == inline
    rerank = RerankJob(model="m", query="q", documents=["d"])
    assert wire(rerank)["kind"] == "rerank"  # the discriminator always travels
