"""Reading corpora: formats, row counts, shards by row range, ids with their type, bad rows kept."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.jobs import Columns, JobKind, ShardRef
from producer.sources import SourceError, check_columns, count_rows, detect_format, plan_shards, read_shard


def _shard(path: Path, fmt: str, start: int, stop: int, index: int = 0) -> ShardRef:
    return ShardRef(index=index, uri=str(path), format=fmt, row_start=start, row_stop=stop)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.parquet", "parquet"), ("A.PQ", "parquet"), ("x.jsonl", "jsonl"), ("x.ndjson", "jsonl"),
     ("s3://b/k/x.csv", "csv"), ("t.txt", "text"), ("t.text", "text")],
)
def test_detect_format(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["corpus.xlsx", "corpus.jsonl.gz", "corpus"])
def test_unsupported_extension_lists_supported(name: str) -> None:
    with pytest.raises(SourceError, match=r"cannot tell the format.*supported: .*\.csv.*\.parquet"):
        detect_format(name)


@pytest.fixture
def int_id_parquet(tmp_path: Path) -> Path:
    """30 rows in row groups of 7, int64 ids that are not the row numbers."""
    path = tmp_path / "ints.parquet"
    table = pa.table({"doc_id": pa.array([1000 + 3 * i for i in range(30)], pa.int64()),
                      "body": [f"text number {i}" for i in range(30)], "other": list(range(30))})
    pq.write_table(table, path, row_group_size=7)
    return path


def test_parquet_shard_across_row_groups_keeps_int_ids(int_id_parquet: Path) -> None:
    assert count_rows(str(int_id_parquet), "parquet") == 30
    rows = read_shard(_shard(int_id_parquet, "parquet", 5, 23), JobKind.embed, Columns(text="body", id="doc_id"))
    assert rows.row_numbers == list(range(5, 23))
    assert rows.ids.type == pa.int64()
    assert rows.ids.to_pylist() == [1000 + 3 * i for i in range(5, 23)]
    assert rows.values == [f"text number {i}" for i in range(5, 23)]
    assert rows.parse_errors == {}


def test_shards_cover_every_row_exactly_once(int_id_parquet: Path) -> None:
    shards = plan_shards(str(int_id_parquet), "parquet", 30, 8)
    assert [(s.index, s.row_start, s.row_stop) for s in shards] == [(0, 0, 8), (1, 8, 16), (2, 16, 24), (3, 24, 30)]
    values = []
    for shard in shards:
        values += read_shard(shard, JobKind.embed, Columns(text="body")).values
    assert values == [f"text number {i}" for i in range(30)]
    with pytest.raises(SourceError, match="shard_rows must be >= 1"):
        plan_shards(str(int_id_parquet), "parquet", 30, 0)


def test_without_id_column_ids_are_row_numbers(int_id_parquet: Path) -> None:
    rows = read_shard(_shard(int_id_parquet, "parquet", 10, 14), JobKind.embed, Columns(text="body"))
    assert rows.ids.type == pa.int64() and rows.ids.to_pylist() == [10, 11, 12, 13]


def test_missing_column_names_it_and_lists_existing(int_id_parquet: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"column 'text' not found in .*ints\.parquet.*it has: doc_id, body, other"):
        check_columns(str(int_id_parquet), "parquet", JobKind.embed, Columns())
    with pytest.raises(SourceError, match=r"column 'nope' not found"):
        check_columns(str(int_id_parquet), "parquet", JobKind.embed, Columns(text="body", id="nope"))
    with pytest.raises(SourceError, match=r"column 'query' not found"):
        check_columns(str(int_id_parquet), "parquet", JobKind.rerank, Columns())
    csv = tmp_path / "c.csv"
    csv.write_text("a,b\n1,x\n")
    with pytest.raises(SourceError, match=r"column 'text' not found.*it has: a, b"):
        check_columns(str(csv), "csv", JobKind.embed, Columns())


def test_jsonl_bad_lines_and_bad_values_are_rows_not_failures(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": "a", "text": "fine"}), json.dumps({"id": "b", "text": 123}),
             "{not json", "", json.dumps({"id": "d", "text": None}), json.dumps([1, 2]),
             json.dumps({"id": "f", "text": "also fine"})]
    path.write_text("\n".join(lines) + "\n")
    assert count_rows(str(path), "jsonl") == 6  # the blank line is not a row
    rows = read_shard(_shard(path, "jsonl", 0, 6), JobKind.embed, Columns(id="id"))
    assert rows.values == ["fine", 123, None, None, None, "also fine"]
    assert rows.ids.to_pylist() == ["a", "b", None, "d", None, "f"]
    assert set(rows.parse_errors) == {2, 4}
    assert "not a JSON object" in rows.parse_errors[2] and "got list" in rows.parse_errors[4]
    tail = read_shard(_shard(path, "jsonl", 3, 6), JobKind.embed, Columns(id="id"))
    assert tail.row_numbers == [3, 4, 5] and set(tail.parse_errors) == {4}


def test_csv_string_ids_and_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,text\nr1,"first, with comma"\nr2,\nr3,"multi\nline"\n')
    assert count_rows(str(path), "csv") == 3
    rows = read_shard(_shard(path, "csv", 0, 3), JobKind.embed, Columns(id="id"))
    assert rows.ids.type == pa.string() and rows.ids.to_pylist() == ["r1", "r2", "r3"]
    assert rows.values == ["first, with comma", "", "multi\nline"]


def test_csv_cells_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("id,text\n007,2024\n008,42\n")
    rows = read_shard(_shard(path, "csv", 0, 2), JobKind.embed, Columns(id="id"))
    assert rows.ids.to_pylist() == ["007", "008"]
    assert rows.values == ["2024", "42"]


def test_text_file_one_text_a_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("first line\r\nsecond — ünïcode\n\nlast\n".encode())
    assert count_rows(str(path), "text") == 4
    rows = read_shard(_shard(path, "text", 0, 4), JobKind.embed, Columns())
    assert rows.values == ["first line", "second — ünïcode", "", "last"]
    assert rows.ids.to_pylist() == [0, 1, 2, 3]


def test_rerank_rows_are_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "d": f"d{i}", "qid": i}) for i in range(4)))
    rows = read_shard(_shard(path, "jsonl", 1, 3), JobKind.rerank, Columns(query="q", document="d", id="qid"))
    assert rows.values == [("q1", "d1"), ("q2", "d2")] and rows.ids.to_pylist() == [1, 2]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "text"])
def test_nonexistent_file_is_a_clear_error(tmp_path: Path, fmt: str) -> None:
    missing = str(tmp_path / f"missing.{fmt}")
    with pytest.raises(SourceError, match="no such file"):
        count_rows(missing, fmt)


def test_corrupt_parquet_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match=r"cannot read .*broken\.parquet.* as parquet"):
        count_rows(str(path), "parquet")


def test_a_rewritten_source_is_read_afresh(tmp_path: Path) -> None:
    path = tmp_path / "daily.jsonl"
    path.write_text(json.dumps({"text": "old"}) + "\n")
    assert read_shard(_shard(path, "jsonl", 0, 1), JobKind.embed, Columns()).values == ["old"]
    path.write_text(json.dumps({"text": "new"}) + "\n" + json.dumps({"text": "more"}) + "\n")
    assert count_rows(str(path), "jsonl") == 2
    assert read_shard(_shard(path, "jsonl", 0, 2), JobKind.embed, Columns()).values == ["new", "more"]



@pytest.mark.parametrize(("fmt", "body"), [("jsonl", '{"text": "first"}\n{"text": "second"}\n'),
                                           ("text", "first\nsecond\n")])
def test_byte_order_mark_is_not_data(tmp_path: Path, fmt: str, body: str) -> None:
    path = tmp_path / f"bom.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rows = read_shard(_shard(path, fmt, 0, 2), JobKind.embed, Columns())
    assert rows.values == ["first", "second"] and rows.parse_errors == {}


def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfid,text\nr1,hello\n")
    check_columns(str(path), "csv", JobKind.embed, Columns(id="id"))
    assert read_shard(_shard(path, "csv", 0, 1), JobKind.embed, Columns(id="id")).ids.to_pylist() == ["r1"]


def test_concurrent_shard_reads_of_one_parquet_file(tmp_path: Path) -> None:
    """Shards of one file are read by several worker threads at once; each gets its own rows
    (one shared cached reader failed with "ReadRangeCache did not find matching cache entry")."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "c.parquet"
    n = 24_000
    pq.write_table(pa.table({"text": [f"text number {i} " * 8 for i in range(n)]}), path, row_group_size=500)
    shards = plan_shards(str(path), "parquet", n, 1000) * 6
    columns = Columns()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: read_shard(s, JobKind.embed, columns), shards))
    for shard, rows in zip(shards, results):
        assert rows.ids.to_pylist() == list(range(shard.row_start, shard.row_stop))
        assert rows.values[0] == f"text number {shard.row_start} " * 8 and len(rows.values) == 1000


def test_csv_integer_ids_stay_integers_in_every_shard(tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    path.write_text("id,text\n1,a\n22,b\n-3,c\n7000000000,d\n")
    first = read_shard(_shard(path, "csv", 0, 1), JobKind.embed, Columns(id="id"))
    rest = read_shard(_shard(path, "csv", 1, 4), JobKind.embed, Columns(id="id"))
    assert first.ids.type == rest.ids.type == pa.int64()
    assert first.ids.to_pylist() + rest.ids.to_pylist() == [1, 22, -3, 7_000_000_000]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("id,text\n1,a\nx2,b\n")
    assert read_shard(_shard(mixed, "csv", 0, 1), JobKind.embed, Columns(id="id")).ids.to_pylist() == ["1"]


def test_default_id_column_is_the_inputs_id(tmp_path: Path) -> None:
    from producer.sources import default_id_column

    with_id = tmp_path / "a.csv"
    with_id.write_text("id,text\n1,a\n")
    without = tmp_path / "b.csv"
    without.write_text("key,text\n1,a\n")
    assert default_id_column(str(with_id), "csv") == "id" and default_id_column(str(without), "csv") is None


def test_a_corrupt_row_group_is_a_permanent_error_naming_the_file_and_group(tmp_path: Path) -> None:
    from worker.hosting.tasks import is_permanent

    path = tmp_path / "corpus.parquet"
    texts = [f"text {i} " + "word " * (i % 50) for i in range(400)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=200, compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 32  # inside the first page's zstd frame
    data[start:start + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))
    columns = Columns(text="text")
    first = read_shard(ShardRef(index=0, uri=str(path), format="parquet", row_start=0, row_stop=200),
                       JobKind.embed, columns)
    assert first.values == texts[:200]  # the intact group still reads
    with pytest.raises(SourceError, match=r"corpus.parquet'.*row group 1 of 2 is corrupt") as caught:
        read_shard(ShardRef(index=1, uri=str(path), format="parquet", row_start=200, row_stop=400),
                   JobKind.embed, columns)
    assert is_permanent(caught.value)


def test_a_corpus_edited_in_place_is_another_job(tmp_path: Path) -> None:
    """Same path, same row count, one row edited: the job id changed before only with the path
    and the count, so a resubmission reported '0 enqueued' and kept the old vector."""
    import os

    from producer.client import plan_corpus
    from producer.errors import OutputConflict

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), corpus)
    first = plan_corpus(str(corpus), str(tmp_path / "out"), model="tiny", id_column="id")
    again = plan_corpus(str(corpus), str(tmp_path / "out"), model="tiny", id_column="id")
    assert again.job_id == first.job_id  # unchanged: the same job, its finished shards are kept
    stat = corpus.stat()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "TWO"]}), corpus)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert corpus.stat().st_size == stat.st_size  # and the same size: the Parquet footer tells them apart
    with pytest.raises(OutputConflict, match="already holds job"):
        plan_corpus(str(corpus), str(tmp_path / "out"), model="tiny", id_column="id")
    edited = plan_corpus(str(corpus), str(tmp_path / "out2"), model="tiny", id_column="id")
    assert edited.job_id != first.job_id


def test_a_row_group_shared_by_shards_is_decoded_once_and_each_shard_gets_its_rows(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One 6,000-row group, 1,000-row shards read together (read-ahead): the group is decoded
    once, not once per shard, and every shard still gets exactly its rows."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from producer import sources

    path = tmp_path / "one-group.parquet"
    n = 6000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}), path,
                   row_group_size=n)
    decoded: list[int] = []
    real, waiter = sources._row_group, threading.Event()

    def counted(pfile, uri, group, names):  # type: ignore[no-untyped-def]
        decoded.append(group)
        waiter.wait(10)  # decode only once another shard waits for this group
        return real(pfile, uri, group, names)

    monkeypatch.setattr(sources, "_row_group", counted)
    monkeypatch.setattr(sources, "_shared_groups", sources._SharedGroups())
    plain_get = sources._SharedGroups.get

    def get(self, key, load):  # type: ignore[no-untyped-def]
        if key in self._entries and not self._entries[key].done():
            waiter.set()
        return plain_get(self, key, load)

    monkeypatch.setattr(sources._SharedGroups, "get", get)
    shards = plan_shards(str(path), "parquet", n, 1000)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda s: read_shard(s, JobKind.embed, Columns(id="id")), shards))
    assert decoded == [0]
    for shard, rows in zip(shards, results):
        assert rows.values == [f"text {i}" for i in range(shard.row_start, shard.row_stop)]
        assert rows.ids.to_pylist() == [f"r{i}" for i in range(shard.row_start, shard.row_stop)]


def test_a_shared_row_group_that_fails_fails_every_waiting_shard_and_is_read_again() -> None:
    from producer.sources import _SharedGroups

    shared, calls = _SharedGroups(), []

    def broken() -> pa.Table:
        calls.append(1)
        raise SourceError("row group 0 of 1 is corrupt")

    for _ in range(2):
        with pytest.raises(SourceError, match="corrupt"):
            shared.get("k", broken)
    assert len(calls) == 2  # the failure was not kept: the next shard reads the group again
    table = pa.table({"text": ["a"]})
    assert shared.get("k", lambda: table) is table and shared.get("k", broken) is table


def test_a_large_shared_row_group_is_not_kept() -> None:
    from producer.sources import _SharedGroups

    shared = _SharedGroups(max_bytes=10)
    big = pa.table({"text": ["x" * 100]})
    assert shared.get("k", lambda: big) is big
    again = pa.table({"text": ["y" * 100]})
    assert shared.get("k", lambda: again) is again  # decoded again: nothing over max_bytes stays
