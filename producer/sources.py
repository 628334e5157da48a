"""Read corpora (Parquet, JSONL, CSV, plain text; local or s3://) and split them into shards.

Shards are references (a URI and a row range), never payloads: the producer only needs a row
count to plan them, and each worker reads just its own range. Rows are returned as Python
values so a worker can judge each one (an empty text, a number where a text belongs) and record
it instead of failing the whole shard.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from producer.errors import SourceError
from producer.jobs import Columns, JobKind, ShardRef
from producer.storage import Location, locate, read_bytes

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


def detect_format(uri: str) -> str:
    """The format from the file extension (``.gz`` etc. are not supported yet and say so)."""
    lowered = uri.lower()
    for ext, fmt in FORMATS.items():
        if lowered.endswith(ext):
            return fmt
    known = ", ".join(sorted(FORMATS))
    raise SourceError(f"cannot tell the format of {uri!r} from its extension; supported: {known}")


@dataclass(frozen=True)
class Rows:
    """A row range of a source: row numbers, ids (the id column's values, or the row numbers)
    and the input values the kind needs (texts, or (query, document) pairs)."""

    row_numbers: list[int]
    ids: pa.Array
    values: list[Any]
    parse_errors: dict[int, str]


ColumnMap = dict[str, Any]  # name -> pa.Array or _PyObjects (both slice and to_pylist)


def _columns_of(table: pa.Table) -> ColumnMap:
    return {name: table.column(name).combine_chunks() for name in table.column_names}


def _read_text(loc: Location) -> pa.Table:
    data = read_bytes(loc).decode("utf-8-sig", errors="replace")
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    return pa.table({"text": pa.array(lines, pa.string())})


def _read_jsonl(loc: Location) -> tuple[ColumnMap, dict[int, str]]:
    """Parse line by line so one bad line is a recorded row error, not a failed corpus."""
    records: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    raw_lines = read_bytes(loc).decode("utf-8-sig", errors="replace").splitlines()
    for number, line in enumerate(line for line in raw_lines if line.strip()):
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        except ValueError as exc:
            errors[number] = f"line is not a JSON object: {exc}"
            value = {}
        records.append(value)
    names: list[str] = []
    for record in records:
        names.extend(key for key in record if key not in names)
    columns = {name: [record.get(name) for record in records] for name in names}
    return {name: _loose_array(values) for name, values in columns.items()}, errors


def _loose_array(values: list[Any]) -> Any:
    """An Arrow array of JSON values where their types agree, else the Python values themselves."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return _PyObjects(values)


class _PyObjects(list):
    """Values of a column whose types disagree; kept as Python values so each row can be judged."""

    def to_pylist(self) -> list[Any]:
        return list(self)

    def slice(self, start: int, length: int) -> "_PyObjects":
        return _PyObjects(self[start : start + length])


def _stamp(uri: str) -> tuple[int | None, int | None]:
    """Size and modification time: a rewritten file is a new cache entry, never stale rows.

    Only a regular file is a source: a FIFO or a device would block the reading slot forever,
    and a folder is not one corpus."""
    loc = locate(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"cannot read {uri!r}: no such file")
    if info.type != pafs.FileType.File:
        kind = "a folder" if info.type == pafs.FileType.Directory else "not a regular file (a FIFO, socket or device)"
        raise SourceError(f"cannot read {uri!r}: it is {kind}")
    return info.size, info.mtime_ns


def _whole_table(uri: str, fmt: str) -> tuple[ColumnMap, int, tuple[tuple[int, str], ...]]:
    return _whole_table_at(uri, fmt, _stamp(uri))


@functools.lru_cache(maxsize=4)
def _whole_table_at(uri: str, fmt: str, stamp: tuple[int | None, int | None]) -> tuple[ColumnMap, int, tuple[tuple[int, str], ...]]:
    """Whole-file formats are read once per process and reused by the shards that follow."""
    loc = locate(uri)
    try:
        if fmt == "jsonl":
            columns, errors = _read_jsonl(loc)
            n_rows = max((len(col) for col in columns.values()), default=len(errors))
            return columns, n_rows, tuple(sorted(errors.items()))
        if fmt == "text":
            table = _read_text(loc)
        else:
            data = read_bytes(loc)
            names = pacsv.open_csv(io.BytesIO(data)).schema.names  # every CSV cell is text: no inference
            options = pacsv.ConvertOptions(strings_can_be_null=False, column_types={n: pa.string() for n in names})
            table = pacsv.read_csv(io.BytesIO(data), convert_options=options)
        return _columns_of(table), table.num_rows, ()
    except FileNotFoundError as exc:
        raise SourceError(f"cannot read {uri!r}: no such file") from exc
    except (OSError, pa.ArrowException, UnicodeError) as exc:
        raise SourceError(f"cannot read {uri!r} as {fmt}: {exc}") from exc


def fingerprint(uri: str, fmt: str) -> dict[str, Any]:
    """What a job id binds of its source's content, so a corpus edited in place is a new job
    (whose output folder is then refused if the old job holds it) instead of stale vectors:
    size and modification time (local files and S3 objects alike), and for Parquet a hash of the
    footer, which holds every row group's sizes and statistics."""
    size, mtime_ns = _stamp(uri)
    stamp: dict[str, Any] = {"size": size, "mtime_ns": mtime_ns}
    if fmt == "parquet":
        stamp["footer_sha256"] = _footer_hash(uri)
    return stamp


def _footer_hash(uri: str) -> str:
    """SHA-256 of a Parquet file's serialized footer (its last 8 bytes give the footer's length)."""
    loc = locate(uri)
    try:
        with loc.fs.open_input_file(loc.path) as handle:
            size = handle.size()
            handle.seek(max(0, size - 8))
            tail = handle.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or length + 8 > size:
                raise SourceError(f"cannot read {uri!r} as parquet: no Parquet footer")
            handle.seek(size - 8 - length)
            return hashlib.sha256(handle.read(length)).hexdigest()
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {uri!r} as parquet: {exc}") from exc


def column_names(uri: str, fmt: str) -> list[str]:
    if fmt == "parquet":
        return list(_parquet(uri).schema_arrow.names)
    return list(_whole_table(uri, fmt)[0])


def _parquet(uri: str) -> pq.ParquetFile:
    return _parquet_at(uri, _stamp(uri))


@functools.lru_cache(maxsize=4)
def _parquet_at(uri: str, stamp: tuple[int | None, int | None]) -> pq.ParquetFile:
    return _open_parquet(uri)


def _open_parquet(uri: str, metadata: Any = None) -> pq.ParquetFile:
    """A reader on a new file handle; ``metadata`` (an already parsed footer) spares reading it."""
    loc = locate(uri)
    try:
        return pq.ParquetFile(loc.fs.open_input_file(loc.path), metadata=metadata)
    except FileNotFoundError as exc:
        raise SourceError(f"cannot read {uri!r}: no such file") from exc
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {uri!r} as parquet: {exc}") from exc


def count_rows(uri: str, fmt: str) -> int:
    """Row count without reading the data where the format allows (Parquet metadata)."""
    if fmt == "parquet":
        return _parquet(uri).metadata.num_rows
    return _whole_table(uri, fmt)[1]


#: The input column whose values become the output's ``id`` when no ``--id-column`` is named.
DEFAULT_ID_COLUMN = "id"


def default_id_column(uri: str, fmt: str) -> str | None:
    """``id`` when the input has such a column (its values are the user's ids), else ``None``
    (the ids are then the row numbers, counted from 0)."""
    return DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in column_names(uri, fmt) else None


def typed_text_column(column: pa.Array) -> pa.Array:
    """A CSV column as a typed reader would give it: int64 when every cell is exactly the decimal
    form of an integer (so ``007`` or ``+3`` stay text: nothing the user wrote is lost), else text."""
    try:
        ints = pc.cast(column, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column
    same = pc.all(pc.equal(pc.cast(ints, pa.string()), column)).as_py()
    return ints if same else column


@functools.lru_cache(maxsize=8)
def _csv_ids_at(uri: str, name: str, stamp: tuple[int | None, int | None]) -> pa.Array:
    """The whole id column, typed once, so every shard's ids have the same type."""
    return typed_text_column(_whole_table_at(uri, "csv", stamp)[0][name])


def needed_columns(kind: JobKind, columns: Columns) -> list[str]:
    if kind == JobKind.rerank:
        wanted = [columns.query, columns.document]
    else:
        wanted = [columns.image] if columns.image else [columns.text]
    return wanted + ([columns.id] if columns.id else [])


def check_columns(uri: str, fmt: str, kind: JobKind, columns: Columns) -> None:
    """Fail the submission early, naming the missing column and the ones that exist."""
    present = column_names(uri, fmt)
    for name in needed_columns(kind, columns):
        if name not in present:
            raise SourceError(
                f"column {name!r} not found in {uri!r}; it has: {', '.join(present) or '(none)'}"
            )


def plan_shards(uri: str, fmt: str, n_rows: int, shard_rows: int) -> list[ShardRef]:
    if shard_rows < 1:
        raise SourceError(f"shard_rows must be >= 1, got {shard_rows}")
    return [
        ShardRef(index=i, uri=uri, format=fmt, row_start=start, row_stop=min(start + shard_rows, n_rows))  # type: ignore[arg-type]
        for i, start in enumerate(range(0, n_rows, shard_rows))
    ]


def _parquet_reader(uri: str) -> pq.ParquetFile:
    """A reader of its own for one shard read, sharing the cached footer.

    A ``ParquetFile`` is not safe to read from two threads at once: concurrent shards on one
    cached reader failed with "ReadRangeCache did not find matching cache entry". A new file
    handle per read, with the metadata already parsed, costs one open."""
    return _open_parquet(uri, _parquet(uri).metadata)


def _parquet_range(uri: str, names: list[str], start: int, stop: int) -> pa.Table:
    """Read only the row groups that overlap [start, stop); a group that other shards overlap
    too is decoded once per process for all of them (``_SharedGroups``)."""
    with _parquet_reader(uri) as pfile:
        groups, first_row, offset = [], None, 0
        for group in range(pfile.metadata.num_row_groups):
            rows = pfile.metadata.row_group(group).num_rows
            if offset + rows > start and offset < stop:
                groups.append((group, offset < start or offset + rows > stop))
                first_row = offset if first_row is None else first_row
            offset += rows
        if not groups:
            return pa.table({name: pa.array([], pfile.schema_arrow.field(name).type) for name in names})
        stamp = _stamp(uri)
        table = pa.concat_tables([
            _shared_groups.get((uri, stamp, group, tuple(names)), lambda g=group: _row_group(pfile, uri, g, names))
            if shared else _row_group(pfile, uri, group, names)
            for group, shared in groups])
    return table.slice(start - (first_row or 0), stop - start)


class _SharedGroups:
    """Decoded row groups that several shards read, each decoded once per process.

    A row group larger than a shard is read by every shard it overlaps, and read-ahead starts
    those shards together: the sample corpus (one 12,000-row group, 2,000-row shards) had its
    whole text column decoded four times at once when ``embedfleet run`` began, 276-438 ms per
    read on the loaded 2-core machine against 10-18 ms for the shards that came after. Here the
    first reader decodes it and the others wait for that one result (errors too: a corrupt
    group fails every shard that asked, and is read again next time). The ``capacity`` most
    recent groups under ``max_bytes`` each stay decoded; a larger one is shared only by the
    readers that wait for it.
    """

    def __init__(self, capacity: int = 2, max_bytes: int = 256 << 20) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Any, Future] = OrderedDict()

    def get(self, key: Any, load: Callable[[], pa.Table]) -> pa.Table:
        with self._lock:
            future = self._entries.get(key)
            owner = future is None
            if owner:
                future = self._entries[key] = Future()
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        assert future is not None
        if owner:
            try:
                table = load()
            except BaseException as exc:
                self._forget(key, future)
                future.set_exception(exc)
                raise
            if table.nbytes > self.max_bytes:
                self._forget(key, future)
            future.set_result(table)
        return future.result()

    def _forget(self, key: Any, future: Future) -> None:
        with self._lock:
            if self._entries.get(key) is future:
                del self._entries[key]


_shared_groups = _SharedGroups()


def _row_group(pfile: pq.ParquetFile, uri: str, group: int, names: list[str]) -> pa.Table:
    """One row group; a corrupt one is the data's fault (permanent), named by file and group."""
    try:
        return pfile.read_row_group(group, columns=names)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise SourceError(f"cannot read {uri!r}: row group {group} of {pfile.metadata.num_row_groups} is corrupt "
                          f"({type(exc).__name__}: {exc})") from exc


def read_shard(shard: ShardRef, kind: JobKind, columns: Columns) -> Rows:
    """The rows of one shard, with ids (the id column, type kept, or the row number from 0)."""
    names = needed_columns(kind, columns)
    start, stop = shard.row_start, shard.row_stop
    parse_errors: dict[int, str] = {}
    if shard.format == "parquet":
        table = _parquet_range(shard.uri, names, start, stop)
        cols = {name: table.column(name).combine_chunks() for name in names}
    else:
        whole, _, errors = _whole_table(shard.uri, shard.format)
        cols = {name: whole[name].slice(start, stop - start) for name in names}
        parse_errors = {row: msg for row, msg in errors if start <= row < stop}
    row_numbers = list(range(start, stop))
    ids = cols[columns.id] if columns.id else pa.array(row_numbers, pa.int64())
    if columns.id and shard.format == "csv":  # CSV cells are text: integer ids stay integers
        ids = _csv_ids_at(shard.uri, columns.id, _stamp(shard.uri)).slice(start, stop - start)
    if kind == JobKind.rerank:
        values: list[Any] = list(zip(cols[columns.query].to_pylist(), cols[columns.document].to_pylist()))
    elif columns.image:  # image references as they are; the worker reads them (``worker.hosting.tasks``)
        values = [{"image": value} for value in cols[columns.image].to_pylist()]
    else:
        values = cols[columns.text].to_pylist()
    return Rows(row_numbers, ids, values, parse_errors)

