"""The rough edges a new user hits with ``embedfleet run``: ids from an ``id`` column without
``--id-column``, CSV integer ids, ``--out dir/`` == ``--out dir``, a progress bar that counts
rows, and a completion line whose rate is this run's rows over this run's time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.timeout(300)


def _parts(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def test_an_id_column_is_used_without_id_column_and_said(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": f"text {i}"}) + "\n" for i in range(5)))
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 0, output
    assert "ids: the input's 'id' column" in output
    assert _parts(tmp_path / "out").column("id").to_pylist() == [f"doc-{i}" for i in range(5)]
    lines = tmp_path / "t.txt"
    lines.write_text("one\ntwo\n")
    code, output = cli(lines, "--out", tmp_path / "lines", "--model", tiny_embed_model)
    assert code == 0 and "ids: row numbers, counted from 0" in output, output


def test_csv_integer_ids_stay_integers(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "c.csv"
    source.write_text("id,text\n" + "".join(f"{10 * i},text {i}\n" for i in range(6)))
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model, "--shard-rows", "4")
    assert code == 0, output
    table = _parts(tmp_path / "out")
    assert table.schema.field("id").type == pa.int64() and table.column("id").to_pylist() == [0, 10, 20, 30, 40, 50]


def test_trailing_slash_is_the_same_job_and_a_rerun_says_what_it_skipped(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                         tiny_embed_model: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(9)))
    code, first = cli(source, "--out", f"{tmp_path / 'vectors'}/", "--model", tiny_embed_model, "--shard-rows", "4")
    assert code == 0, first
    rate = re.search(r"9 of 9 rows written to \S+ in 3 part\(s\) in ([0-9.,]+) s: ([0-9,]+) texts/s", first)
    assert rate, first
    printed = rate.group(1).replace(",", "")
    seconds, per_s = float(printed), int(rate.group(2).replace(",", ""))
    # the rate is this run's rows over this run's wall time, which the printed seconds give only to
    # their rounding (a fast job prints 0.1 s for 0.114 s: 79 texts/s, not 90)
    half = 0.5 * 10 ** -(len(printed.split(".")[1]) if "." in printed else 0)
    assert 9 / (seconds + half) - 1 <= per_s <= 9 / max(seconds - half, 1e-3) + 1, first
    code, again = cli(source, "--out", tmp_path / "vectors", "--model", tiny_embed_model, "--shard-rows", "4")
    assert code == 0, again  # the same job: no "already holds job" conflict
    assert "9 of 9 rows skipped: their parts were done by an earlier run" in again
    assert "nothing left to do" in again and "texts/s," not in again.split("complete:")[-1]


def test_the_progress_bar_counts_rows_not_attempts(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "c.jsonl"
    records = [{"text": "fine"}, {"text": ""}, {"text": 5}, {"text": "fine too"}, {"text": " "}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model)
    assert code == 0, output
    counts = {tuple(map(int, m)) for m in re.findall(r"\b(\d+)/(\d+)\b", output)}
    assert (5, 5) in counts and all(done <= total for done, total in counts), output
    assert "3 row(s) rejected" in output and "rows are counted from 0" in output
    reasons = [e["reason"] for e in json.loads((tmp_path / "out" / "_manifest.json").read_text())["errors"]]
    assert [r.split(":")[0] for r in reasons] == ["row 1 (counted from 0)", "row 2 (counted from 0)",
                                                  "row 4 (counted from 0)"]


def test_backend_auto_says_what_it_chose_and_reuses_it(cli, tmp_path: Path, tiny_embed_model: Path,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(5)))
    args = ("--model", tiny_embed_model, "--backend", "auto", "--dtype", "float32")
    code, first = cli(source, "--out", tmp_path / "a", *args)
    assert code == 0, first
    chosen = re.search(r"backend auto: (\w+/float32): the fastest of \d+ candidates", first)
    assert chosen and "measured now on 64 texts" in first and "max|dp|" in first and "nan" not in first, first
    code, again = cli(source, "--out", tmp_path / "b", *args)
    assert code == 0, again
    assert f"backend auto: {chosen.group(1)}:" in again and "cached, measured" in again, again
    assert "max|dp|" not in again  # no table: nothing was timed
