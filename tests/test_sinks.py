"""Parquet tables (schema, ids, metadata), part files, done-markers and the manifest written last."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.jobs import (
    JOB_FILE,
    MANIFEST,
    PARTS_DIR,
    SUCCESS,
    Columns,
    JobKind,
    JobSpec,
    RowError,
    ShardReport,
    ShardRef,
)
from producer.storage import locate, publish_json
from worker import sinks
from worker.engine.pipeline import EngineResult
from worker.models.resolve import ModelInfo


def _info(kind: JobKind = JobKind.embed, labels: tuple[str, ...] = (), normalize: bool = True) -> ModelInfo:
    return ModelInfo(ref="some/model", name="model", path=Path("."), kind=kind, architecture="BertModel",
                     model_type="bert", hidden_size=4, max_length=16, pooling="mean", normalize=normalize,
                     labels=labels, revision="0123456789abcdef")


def _result(kind: JobKind, values: np.ndarray, errors: dict[int, str] | None = None) -> EngineResult:
    n = len(values)
    return EngineResult(kind=kind, values=values, n_tokens=[3 + i for i in range(n)],
                        truncated=[i == 1 for i in range(n)], errors=errors or {})


def test_embedding_table_schema_ids_and_metadata() -> None:
    values = np.arange(20, dtype=np.float32).reshape(5, 4)
    ids = pa.array([10, 11, 12, 13, 14], pa.int64())
    table = sinks.result_table(_info(), _result(JobKind.embed, values, {2: "bad"}), ids, [0, 1, 3, 4],
                               "float32", "float32")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("n_tokens").type == pa.int32()
    assert table.schema.field("truncated").type == pa.bool_()
    assert table.column("id").to_pylist() == [10, 11, 13, 14]
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist()), values[[0, 1, 3, 4]])
    assert table.column("n_tokens").to_pylist() == [3, 4, 6, 7]
    assert table.column("truncated").to_pylist() == [False, True, False, False]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["embedfleet.model"] == "some/model"
    assert meta["embedfleet.model_revision"] == "0123456789abcdef"
    assert meta["embedfleet.dimensions"] == "4"
    assert meta["embedfleet.normalized"] == "true"
    assert meta["embedfleet.output_dtype"] == "float32" and meta["embedfleet.compute_dtype"] == "float32"
    assert meta["embedfleet.kind"] == "embed"


def test_float16_output() -> None:
    values = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    table = sinks.result_table(_info(), _result(JobKind.embed, values), pa.array(["a", "b", "c"]), [0, 1, 2],
                               "float16", "float32")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    assert table.schema.field("id").type == pa.string()
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, values.astype(np.float16).astype(np.float32))
    assert table.schema.metadata[b"embedfleet.output_dtype"] == b"float16"


def test_rerank_table_has_scores() -> None:
    info = _info(JobKind.rerank, labels=("LABEL_0",))
    table = sinks.result_table(info, _result(JobKind.rerank, np.array([0.1, 0.9, 0.5], np.float32)),
                               pa.array([0, 1, 2], pa.int64()), [0, 2], "float32", "float32")
    assert table.schema.field("score").type == pa.float32()
    assert table.column("score").to_pylist() == pytest.approx([0.1, 0.5])
    assert "embedding" not in table.column_names


def test_classify_table_has_label_score_scores() -> None:
    info = _info(JobKind.classify, labels=("neg", "neu", "pos"))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]], np.float32)
    table = sinks.result_table(info, _result(JobKind.classify, probs), pa.array([5, 6, 7], pa.int64()),
                               [0, 1, 2], "float32", "float32")
    assert table.column("label").to_pylist() == ["neg", "pos", "neu"]
    assert table.column("score").to_pylist() == pytest.approx([0.7, 0.8, 0.5])
    assert table.schema.field("scores").type == pa.list_(pa.float32(), 3)
    assert json.loads(table.schema.metadata[b"embedfleet.labels"]) == ["neg", "neu", "pos"]


@pytest.mark.parametrize("kind", [JobKind.embed, JobKind.classify])
def test_shard_where_every_row_failed_gives_an_empty_table(kind: JobKind) -> None:
    info = _info(kind, labels=("a", "b", "c") if kind == JobKind.classify else ())
    values = np.zeros((2, 4 if kind == JobKind.embed else 3), np.float32)
    table = sinks.result_table(info, _result(kind, values, {0: "bad", 1: "bad"}), pa.array([1, 2]), [],
                               "float32", "float32")
    assert table.num_rows == 0


def test_ids_array_keeps_type_or_falls_back_to_strings() -> None:
    assert sinks.ids_array([1, 2, 3]).type == pa.int64()
    assert sinks.ids_array(["a", "b"]).type == pa.string()
    mixed = sinks.ids_array([1, "b", None])
    assert mixed.type == pa.string() and mixed.to_pylist() == ["1", "b", None]
    chunked = pa.chunked_array([[1, 2], [3]])
    assert sinks.ids_array(chunked).to_pylist() == [1, 2, 3]


def _spec(out: Path, n_shards: int) -> JobSpec:
    shards = [ShardRef(index=i, uri="src.parquet", format="parquet", row_start=2 * i, row_stop=2 * i + 2)
              for i in range(n_shards)]
    spec = JobSpec(job_id="job1", kind=JobKind.embed, model="m", source="src.parquet", out=str(out),
                   columns=Columns(), n_rows=2 * n_shards, shards=shards)
    publish_json(locate(str(out)).child(JOB_FILE), spec.model_dump(mode="json"))
    return spec


def test_part_then_marker_then_manifest_last(tmp_path: Path) -> None:
    out = tmp_path / "job"
    _spec(out, 2)
    table = sinks.result_table(_info(), _result(JobKind.embed, np.ones((2, 4), np.float32)),
                               pa.array([0, 1], pa.int64()), [0, 1], "float32", "float32")
    uri = sinks.write_part(str(out), 0, table)
    assert uri.endswith("part-00000.parquet") and pq.read_table(uri).equals(table)
    assert pq.read_schema(uri).metadata[b"embedfleet.model"] == b"some/model"
    err = RowError(row=1, id=1, field="text", reason="row 1 is empty")
    sinks.write_marker(str(out), ShardReport(index=0, path="part-00000.parquet", rows_in=2, rows_written=1,
                                             n_tokens=5, errors=[err]))
    assert sinks.finalize_if_complete(str(out), "rev") is None
    assert not (out / MANIFEST).exists() and not (out / SUCCESS).exists()
    sinks.write_marker(str(out), ShardReport(index=1, path="part-00001.parquet", rows_in=2, rows_written=2,
                                             n_tokens=7))
    manifest = sinks.finalize_if_complete(str(out), "rev")
    assert manifest is not None and manifest.status == "complete"
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["rows_written"] == 3 and on_disk["n_tokens"] == 12 and on_disk["n_rows"] == 4
    assert on_disk["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert on_disk["errors"] == [{"row": 1, "id": 1, "field": "text", "reason": "row 1 is empty"}]
    assert on_disk["model_revision"] == "rev"
    assert (out / SUCCESS).exists()
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["part-00000.json", "part-00001.json"]
    assert not [p for p in out.rglob("*.tmp-*")], "a temporary file was left behind"
    # Finalizing again (two shards racing) writes the same bytes.
    before = (out / MANIFEST).read_bytes()
    sinks.finalize_if_complete(str(out), "rev")
    assert (out / MANIFEST).read_bytes() == before


def test_failed_shard_makes_a_partial_manifest_without_success(tmp_path: Path) -> None:
    out = tmp_path / "job"
    _spec(out, 2)
    sinks.write_marker(str(out), ShardReport(index=0, path="part-00000.parquet", rows_in=2, rows_written=2,
                                             n_tokens=4))
    sinks.write_marker(str(out), ShardReport(index=1, path=None, rows_in=2, rows_written=0, n_tokens=0,
                                             status="failed", failure="boom"))
    manifest = sinks.finalize_if_complete(str(out), None)
    assert manifest is not None and manifest.status == "partial"
    assert manifest.parts == ["part-00000.parquet"] and manifest.failed_shards[0].failure == "boom"
    assert (out / MANIFEST).exists() and not (out / SUCCESS).exists()


def test_vector_columns_are_written_without_a_dictionary(tmp_path: Path) -> None:
    """Vectors never repeat: their column chunks are plain (pyarrow's dictionary attempt and fallback
    cost three times the write); the other columns keep theirs, and the rows read back unchanged."""
    values = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    table = sinks.result_table(_info(), _result(JobKind.embed, values), pa.array([f"r{i}" for i in range(50)]),
                               list(range(50)), "float32", "float32")
    sinks.write_part(str(tmp_path), 0, table)
    path = tmp_path / "part-00000.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: set(meta.column(i).encodings) for i in range(meta.num_columns)}
    dictionary = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert not encodings["embedding.list.element"] & dictionary
    assert encodings["id"] & dictionary
    assert pq.read_table(path).equals(table)


def test_the_manifest_times_the_job_from_its_markers(tmp_path: Path) -> None:
    """``started_at`` / ``finished_at`` come from the markers (the first start, the last durable
    part), so a job's time is exact, not a status poll's, and racing writers still agree."""
    out = tmp_path / "job"
    _spec(out, 2)
    for index, (start, end) in enumerate([(100.5, 101.25), (100.0, 100.75)]):
        sinks.write_marker(str(out), ShardReport(index=index, path=f"part-0000{index}.parquet", rows_in=2,
                                                 rows_written=2, n_tokens=4, started_at=start, finished_at=end))
    manifest = sinks.finalize_if_complete(str(out), None)
    assert manifest is not None and (manifest.started_at, manifest.finished_at) == (100.0, 101.25)
    assert manifest.seconds_since(99.0) == pytest.approx(2.25)
    assert manifest.seconds_since(101.25) is None  # nothing written after that submission: no time
    old = manifest.model_copy(update={"started_at": None, "finished_at": None})
    assert old.seconds_since(99.0) is None  # markers of workers that did not record times


def test_ids_follow_the_kept_rows_in_every_order() -> None:
    """No failed row (the usual shard) takes the ids as they are, without a ``take``; any other
    ``keep`` (rows dropped, or in another order) still takes exactly those rows."""
    ids = pa.array(["a", "b", "c"])
    values = np.ones((3, 4), np.float32)
    whole = sinks.result_table(_info(), _result(JobKind.embed, values), ids, [0, 1, 2], "float32", "float32")
    assert whole.column("id").to_pylist() == ["a", "b", "c"]
    part = sinks.result_table(_info(), _result(JobKind.embed, values), ids, [0, 2], "float32", "float32")
    assert part.column("id").to_pylist() == ["a", "c"]
    swapped = sinks.result_table(_info(), _result(JobKind.embed, values), ids, [1, 0, 2], "float32", "float32")
    assert swapped.column("id").to_pylist() == ["b", "a", "c"]


@pytest.mark.parametrize("kind", [JobKind.embed, JobKind.rerank, JobKind.classify])
def test_the_sink_warm_up_builds_and_serializes_a_part(kind: JobKind) -> None:
    info = _info(kind, labels=("neg", "pos") if kind == JobKind.classify else ())
    assert sinks.warm_up(info, "float32") >= 0
