"""``embedfleet run`` end to end: real files in, real Parquet out, through the embedded worker.

Most runs go through Typer's CliRunner on ``worker.cli.app`` (one process, so imports are paid
once); two go through the installed ``embedfleet`` executable to check real exit codes and
output. Corpora are small and built per test; models are the tiny random ones except where the
bundled model's vectors are checked against sentence-transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
EMBEDFLEET = REPO / ".venv" / "bin" / "embedfleet"

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------- helpers
def read_parts(out: Path) -> pa.Table:
    parts = sorted(out.glob("part-*.parquet"))
    assert parts, f"no part files in {out}: {sorted(p.name for p in out.iterdir())}"
    return pa.concat_tables([pq.read_table(p) for p in parts])


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "_manifest.json").read_text())


def meta(path: Path) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def int_id_parquet(path: Path, n: int) -> Path:
    from tests.fixtures_extra import sample_texts

    texts = sample_texts(n, step=131)
    pq.write_table(pa.table({"doc_id": pa.array([7_000_000_000 + 11 * i for i in range(n)], pa.int64()),
                             "text": texts, "extra": list(range(n))}), path, row_group_size=9)
    return path


# ---------------------------------------------------------------------------- the happy paths
def test_parquet_int_ids_bundled_model_schema_manifest_and_rerun(cli, tmp_path: Path, bundled_model: Path) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    source = int_id_parquet(tmp_path / "corpus.parquet", 40)
    out = tmp_path / "vectors"
    args = (source, "--out", out, "--id-column", "doc_id", "--shard-rows", "16")
    code, output = cli(*args)
    assert code == 0, output
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet",
                                                                  "part-00002.parquet"]
    assert (out / "_SUCCESS").exists() and (out / "_job.json").exists() and (out / "_manifest.json").exists()
    table = read_parts(out)
    schema = table.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert schema.field("n_tokens").type == pa.int32() and schema.field("truncated").type == pa.bool_()
    source_table = pq.read_table(source)
    assert table.column("id").to_pylist() == source_table.column("doc_id").to_pylist()
    file_meta = meta(out / "part-00000.parquet")
    assert file_meta["embedfleet.model"] == "all-MiniLM-L6-v2"
    assert len(file_meta["embedfleet.model_revision"]) == 16
    assert file_meta["embedfleet.dimensions"] == "384" and file_meta["embedfleet.normalized"] == "true"
    assert file_meta["embedfleet.output_dtype"] == "float32" and file_meta["embedfleet.compute_dtype"] == "float32"
    m = manifest(out)
    assert m["status"] == "complete" and m["n_rows"] == 40 and m["rows_written"] == 40 and m["errors"] == []
    assert m["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert m["model_revision"] == file_meta["embedfleet.model_revision"]
    assert m["n_tokens"] == sum(table.column("n_tokens").to_pylist())
    # The vectors are the model's: compare with sentence-transformers.
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    want = SentenceTransformer(str(bundled_model), device="cpu").encode(source_table.column("text").to_pylist())
    cos = (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
    # Running the same command again adds nothing and changes nothing.
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    code, output = cli(*args)
    assert code == 0, output
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == before
    assert read_parts(out).num_rows == 40


def test_jsonl_bad_rows_recorded_others_written(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    records = [{"id": f"doc-{i}", "text": f"a perfectly fine text number {i}"} for i in range(12)]
    records[2]["text"] = ""
    records[5]["text"] = 123
    records[8]["text"] = None
    records[10]["text"] = "   \t "
    source = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--id-column", "id", "--shard-rows", "5")
    assert code == 0, output
    m = manifest(out)
    assert m["status"] == "complete" and m["n_rows"] == 12 and m["rows_written"] == 8
    by_row = {e["row"]: e for e in m["errors"]}
    assert sorted(by_row) == [2, 5, 8, 10]
    assert {r: e["id"] for r, e in by_row.items()} == {2: "doc-2", 5: "doc-5", 8: "doc-8", 10: "doc-10"}
    assert "empty" in by_row[2]["reason"] and "empty" in by_row[10]["reason"]
    assert "must be a string, got int" in by_row[5]["reason"]
    assert "must be a string, got NoneType" in by_row[8]["reason"]
    assert all(e["field"] == "text" for e in m["errors"])
    table = read_parts(out)
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(12) if i not in by_row]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert "4 row(s) rejected" in output


def test_rerun_redoes_only_the_missing_shard(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = int_id_parquet(tmp_path / "c.parquet", 12)
    out = tmp_path / "out"
    args = (source, "--out", out, "--model", tiny_embed_model, "--id-column", "doc_id", "--shard-rows", "5")
    assert cli(*args)[0] == 0
    kept = (out / "part-00000.parquet").stat().st_mtime_ns
    redo = (out / "part-00001.parquet").read_bytes()
    for name in ("part-00001.parquet", "_parts/part-00001.json", "_manifest.json", "_SUCCESS"):
        (out / name).unlink()
    code, output = cli(*args)
    assert code == 0, output
    assert (out / "part-00000.parquet").stat().st_mtime_ns == kept, "a finished shard was redone"
    again, first = pq.read_table(out / "part-00001.parquet"), pq.read_table(pa.BufferReader(redo))
    # The rerun batches this shard alone, not beside the others, so BLAS may round the last bit
    # differently: ids and token counts must match exactly, the vectors to float precision.
    assert again.schema == first.schema
    assert again.drop(["embedding"]).equals(first.drop(["embedding"]))
    np.testing.assert_allclose(np.array(again.column("embedding").to_pylist()),
                               np.array(first.column("embedding").to_pylist()), rtol=0, atol=1e-5)
    assert read_parts(out).column("id").to_pylist() == pq.read_table(source).column("doc_id").to_pylist()
    assert manifest(out)["rows_written"] == 12 and (out / "_SUCCESS").exists()

def test_one_device_holds_a_small_jobs_every_shard_at_once(cli, tmp_path: Path, tiny_embed_model: Path,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On one device ``run`` holds 8 shards (``--concurrency`` 4 and as many read ahead), so a job of
    6 is in the engine at once: every shard starts before any finishes. With the old default of 2
    (4 held) the last 2 started only after one had finished and been written, a second wave that
    began with the device idle (issue 13). Each batch is slowed so no shard can finish early."""
    from worker.backends.torch import TorchBackend

    launch = TorchBackend.launch

    def slow(self, batch, precise=False):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return launch(self, batch, precise)

    monkeypatch.setattr(TorchBackend, "launch", slow)
    source = int_id_parquet(tmp_path / "c.parquet", 30)
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--id-column", "doc_id", "--shard-rows", "5")
    assert code == 0, output
    markers = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))]
    assert len(markers) == 6 and manifest(out)["rows_written"] == 30
    assert max(m["started_at"] for m in markers) < min(m["finished_at"] for m in markers), markers


def test_csv_string_ids_float16_and_dimensions(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "c.csv"
    source.write_text("key,body\n" + "".join(f'k{i},"text, number {i}"\n' for i in range(7)))
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--id-column", "key",
                       "--text-column", "body", "--output-dtype", "float16", "--dimensions", "16")
    assert code == 0, output
    table = read_parts(out)
    assert table.column("id").to_pylist() == [f"k{i}" for i in range(7)]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 16)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # renormalized after the cut
    file_meta = meta(out / "part-00000.parquet")
    assert file_meta["embedfleet.dimensions"] == "16" and file_meta["embedfleet.output_dtype"] == "float16"


def test_text_file_ids_are_row_numbers(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "lines.txt"
    source.write_text("first line\nsecond line\n\nfourth — ünïcode ✓\n")
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model)
    assert code == 0, output
    table = read_parts(out)
    assert table.schema.field("id").type == pa.int64()
    assert table.column("id").to_pylist() == [0, 1, 3]
    m = manifest(out)
    assert [(e["row"], e["id"]) for e in m["errors"]] == [(2, 2)] and "empty" in m["errors"][0]["reason"]


def test_prompt_name_and_truncate_off_through_the_cli(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "short"}, {"text": " ".join(["long"] * 200)}])
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--prompt-name", "query", "--no-truncate")
    assert code == 0, output
    m = manifest(out)
    assert m["rows_written"] == 1 and [e["row"] for e in m["errors"]] == [1]
    assert "maximum of 64 tokens" in m["errors"][0]["reason"]
    plain = tmp_path / "plain"
    assert cli(source, "--out", plain, "--model", tiny_embed_model)[0] == 0
    with_prompt = np.array(read_parts(out).column("embedding").to_pylist()[0])
    without = np.array(read_parts(plain).column("embedding").to_pylist()[0])
    assert np.abs(with_prompt - without).max() > 1e-4, "--prompt-name made no difference"
    assert read_parts(plain).column("truncated").to_pylist() == [False, True]


@pytest.mark.timeout(25)
@pytest.mark.parametrize("flags", [("--prompt-name", "nope"), ("--dimensions", "64")])
def test_options_the_model_cannot_honour_are_exit_2(cli, tmp_path: Path, tiny_embed_model: Path,  # type: ignore[no-untyped-def]
                                                    flags: tuple[str, str]) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model, *flags)
    assert code == 2 and ("prompt_name 'nope'" in output or "dimensions=64" in output)
    assert not (tmp_path / "out" / "_job.json").exists()


def test_rerank_corpus_gives_scores(cli, tmp_path: Path, tiny_rerank_model: Path) -> None:  # type: ignore[no-untyped-def]
    records = [{"qid": i, "query": f"question {i % 2}", "document": f"candidate passage {i}"} for i in range(6)]
    records[3]["document"] = ""
    source = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_rerank_model, "--id-column", "qid")
    assert code == 0, output
    table = read_parts(out)
    assert table.schema.field("score").type == pa.float32() and "embedding" not in table.column_names
    assert table.column("id").to_pylist() == [0, 1, 2, 4, 5]
    scores = np.array(table.column("score").to_pylist())
    assert ((scores > 0) & (scores < 1)).all()
    m = manifest(out)
    assert [(e["row"], e["id"], e["field"]) for e in m["errors"]] == [(3, 3, "query/document")]
    assert meta(out / "part-00000.parquet")["embedfleet.kind"] == "rerank"


def test_classify_corpus_gives_label_score_scores(cli, tmp_path: Path, tiny_classify_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"review number {i}, it was fine" for i in range(5)]}), source)
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_classify_model)
    assert code == 0, output
    table = read_parts(out)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert set(table.column("label").to_pylist()) <= {"negative", "neutral", "positive"}
    assert table.schema.field("scores").type == pa.list_(pa.float32(), 3)
    scores = np.array(table.column("scores").to_pylist())
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(table.column("score").to_pylist(), scores.max(1), rtol=1e-6)
    labels = ["negative", "neutral", "positive"]
    assert table.column("label").to_pylist() == [labels[i] for i in scores.argmax(1)]


def test_metadata_reports_the_normalization_actually_applied(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "one"}, {"text": "two words"}])
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--no-normalize")
    assert code == 0, output
    vectors = np.array(read_parts(out).column("embedding").to_pylist())
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # really not normalized
    assert meta(out / "part-00000.parquet")["embedfleet.normalized"] == "false"



@pytest.mark.timeout(40)
def test_shard_with_only_bad_rows_still_completes(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    records = [{"id": i, "text": "fine text"} for i in range(4)]
    records[2]["text"] = ""
    records[3]["text"] = None
    source = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out"
    code, output = cli(source, "--out", out, "--model", tiny_embed_model, "--id-column", "id", "--shard-rows", "2")
    assert code == 0, output
    m = manifest(out)
    assert m["status"] == "complete" and m["rows_written"] == 2 and m["failed_shards"] == []
    assert [(e["row"], e["id"]) for e in m["errors"]] == [(2, 2), (3, 3)]
    assert read_parts(out).column("id").to_pylist() == [0, 1]

# ---------------------------------------------------------------------------- bad invocations
def test_missing_column_names_it_and_lists_existing(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "c.jsonl", [{"body": "x", "key": 1}])
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 2
    assert "column 'text' not found" in output and "it has: body, key" in output
    code, output = cli(source, "--out", tmp_path / "out2", "--model", tiny_embed_model, "--text-column", "body",
                       "--id-column", "nope")
    assert code == 2 and "column 'nope' not found" in output
    assert not (tmp_path / "out" / "_job.json").exists()


def test_unknown_model(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    code, output = cli(source, "--out", tmp_path / "out", "--model", "no-such-org/no-such-model")
    assert code == 2 and "no-such-org/no-such-model" in output
    code, output = cli(source, "--out", tmp_path / "out", "--model", str(tmp_path / "not-here"))
    assert code == 2 and "not-here" in output


@pytest.mark.parametrize("name", ["missing.parquet", "missing.jsonl", "missing.csv"])
def test_nonexistent_file(cli, tmp_path: Path, tiny_embed_model: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    code, output = cli(tmp_path / name, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 2 and "no such file" in output and name in output


def test_unreadable_file(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"PAR1 but not really parquet")
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 2 and "cannot read" in output and "broken.parquet" in output


def test_unsupported_extension(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "corpus.xlsx"
    source.write_bytes(b"whatever")
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 2 and "corpus.xlsx" in output and "supported:" in output and ".parquet" in output


def test_kind_mismatch_and_bad_options(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    code, output = cli(source, "--out", tmp_path / "a", "--model", tiny_embed_model, "--kind", "rerank")
    assert code == 2 and "--kind rerank" in output and "embed model" in output
    code, output = cli(source, "--out", tmp_path / "b", "--model", tiny_embed_model, "--prompt", "p: ",
                       "--prompt-name", "query")
    assert code == 2 and "either prompt or prompt_name" in output
    code, output = cli(source, "--out", tmp_path / "c", "--model", tiny_embed_model, "--output-dtype", "int8")
    assert code == 2 and "output_dtype" in output


def test_other_job_in_the_output_folder_is_refused(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    out = tmp_path / "out"
    assert cli(first, "--out", out, "--model", tiny_embed_model)[0] == 0
    code, output = cli(second, "--out", out, "--model", tiny_embed_model)
    assert code == 2 and "already holds job" in output
    assert read_parts(out).num_rows == 1


# ---------------------------------------------------------------------------- the real executable
def _run_exe(*args: Any, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", "PYTHONPATH": str(REPO)}
    exe = [str(EMBEDFLEET)] if EMBEDFLEET.exists() else [sys.executable, "-c", "from worker.cli import main; main()"]
    return subprocess.run([*exe, "run", *map(str, args), "--device", "cpu"], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def test_executable_success_and_bad_rows(tmp_path: Path, tiny_embed_model: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "hello"}, {"id": "b", "text": 123},
                                                {"id": "c", "text": None}, {"id": "d", "text": "world"}])
    out = tmp_path / "out"
    proc = _run_exe(source, "--out", out, "--model", tiny_embed_model, "--id-column", "id")
    assert proc.returncode == 0, proc.stderr
    assert read_parts(out).column("id").to_pylist() == ["a", "d"]
    assert [(e["row"], e["id"]) for e in manifest(out)["errors"]] == [(1, "b"), (2, "c")]
    assert "2 of 4 rows written" in " ".join(proc.stderr.split())


def test_executable_missing_column_exit_code(tmp_path: Path, tiny_embed_model: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text("title,year\nx,1\n")
    proc = _run_exe(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert "column 'text' not found" in text and "title, year" in text
    assert "Traceback" not in text
