"""URIs to filesystems (local paths and ``s3://``), atomic publish, and small JSON helpers.

Everything a job writes goes through here so that outputs are idempotent: a file appears under
its final name only when it is complete (temp + rename locally; on S3 an object becomes visible
only when its upload completes), and single storage calls are retried with tenacity because they
are idempotent.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from producer.errors import BadInput, Unavailable
from producer.jobs import JOB_FILE, MANIFEST, PARTS_DIR, JobManifest, JobSpec, ShardReport, marker_name
from producer.settings import aws_endpoint, aws_identity, aws_region
from tenacity import (
    retry,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

T = TypeVar("T")

_TRANSIENT: tuple[type[BaseException], ...] = (OSError, pa.ArrowException)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_RETRYABLE_S3_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "503", "500"}

try:  # boto3 is optional (the aws extra); its network errors are transient, as are S3's 5xx
    from botocore.exceptions import BotoCoreError, ClientError

    _TRANSIENT = _TRANSIENT + (BotoCoreError,)
except ImportError:  # pragma: no cover
    ClientError = None  # type: ignore[assignment,misc]


def _transient_s3(exc: BaseException) -> bool:
    if ClientError is None or not isinstance(exc, ClientError):
        return False
    return str(exc.response.get("Error", {}).get("Code")) in _RETRYABLE_S3_CODES


storage_retry: Callable[[Callable[..., T]], Callable[..., T]] = retry(
    reraise=True,
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=0.2, max=5),
    # A missing file or a refused permission is an answer, not a transient failure.
    retry=(retry_if_exception_type(_TRANSIENT) & retry_if_not_exception_type(_PERMANENT))
    | retry_if_exception(_transient_s3),
)


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> "Location":
        sep = "" if self.path.endswith("/") else "/"
        uri_sep = "" if self.uri.endswith("/") else "/"
        return Location(self.fs, f"{self.path}{sep}{name}", f"{self.uri}{uri_sep}{name}")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem honouring ``AWS_ENDPOINT_URL(_S3)`` so moto and MinIO work unchanged."""
    endpoint = aws_endpoint("s3")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    region = aws_region()
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _boto_s3() -> Any:
    """A boto3 S3 client for the current endpoint, region and credentials (one per such set).

    Keyed on the environment so a process that points at another endpoint (tests, MinIO) never
    reuses a client bound to the old one; boto3 clients are thread-safe, so one is shared.
    """
    return _boto_s3_for(aws_identity())


@functools.lru_cache(maxsize=8)
def _boto_s3_for(settings: tuple[str | None, ...]) -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise Unavailable("writing to s3:// needs boto3: pip install 'embedfleet[aws]'") from exc
    region = settings[2] or settings[3]
    return boto3.client("s3", region_name=region, endpoint_url=settings[0] or settings[1])


def locate(uri: str) -> Location:
    """Resolve a URI or a plain path to a filesystem and a path."""
    if uri.startswith("s3://"):
        return Location(s3_filesystem(), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise BadInput(f"unsupported storage scheme '{scheme}://' in {uri!r}; use a local path or s3://")
    path = os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)


@storage_retry
def ensure_dir(loc: Location) -> None:
    """Create a directory (a no-op on S3, where prefixes need no creation)."""
    if loc.is_local:
        os.makedirs(loc.path, exist_ok=True)


@storage_retry
def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


@storage_retry
def list_names(loc: Location) -> list[str]:
    """Base names of the files directly under a directory or prefix (empty if it does not exist)."""
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    return sorted(info.base_name for info in loc.fs.get_file_info(selector))


@storage_retry
def delete(loc: Location) -> None:
    """Remove a file; a missing one is fine (deleting is idempotent)."""
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


@storage_retry
def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as stream:
        return stream.read()


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


@storage_retry
def publish_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file, never a part."""
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, loc.path)
        except BaseException:  # a full or failing disk: never leave the partial file behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    # S3: one PutObject; the object becomes visible whole, or not at all.
    bucket, _, key = loc.path.partition("/")
    _boto_s3().put_object(Bucket=bucket, Key=key, Body=data)


def publish_json(loc: Location, value: Any) -> None:
    publish_bytes(loc, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def publish_table(loc: Location, table: pa.Table, compression: str = "zstd",
                  dictionary: bool | list[str] = True) -> None:
    """Serialize a table to Parquet in memory, then publish it atomically. ``dictionary``: the
    columns to dictionary-encode (pyarrow's ``use_dictionary``: all, none, or those named)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, use_dictionary=dictionary)
    publish_bytes(loc, sink.getvalue().to_pybytes())


@storage_retry
def read_table(loc: Location) -> pa.Table:
    return pq.read_table(loc.path, filesystem=loc.fs)


#: The last job specs read, by location: the file's bytes and the spec validated from them.
_JOB_SPECS: "collections.OrderedDict[str, tuple[bytes, JobSpec]]" = collections.OrderedDict()
_JOB_SPECS_LOCK = threading.Lock()


def read_job(out: str) -> JobSpec:
    """The job spec a producer wrote to ``{out}/_job.json`` (treat it as read-only: it may be shared).

    Why the cache: a worker reads the spec twice per shard (the trust check, the manifest's
    check), and validating a spec of N shards is N shard references. On the H200 that Python ran
    on a bulk job's shard threads beside the device thread (bench.bulk's GIL profile, issue 13).
    The file is still read every time; only bytes equal to the last read skip the validation."""
    loc = locate(out).child(JOB_FILE)
    data = read_bytes(loc)
    with _JOB_SPECS_LOCK:
        cached = _JOB_SPECS.get(loc.uri)
    if cached is not None and cached[0] == data:
        return cached[1]
    spec = JobSpec.model_validate(json.loads(data))
    with _JOB_SPECS_LOCK:
        _JOB_SPECS[loc.uri] = (data, spec)
        _JOB_SPECS.move_to_end(loc.uri)
        while len(_JOB_SPECS) > 8:
            _JOB_SPECS.popitem(last=False)
    return spec


def read_marker(out: str, index: int) -> ShardReport | None:
    """The done-marker of a shard, or ``None`` if it has not finished."""
    loc = locate(out).child(PARTS_DIR).child(marker_name(index))
    if not exists(loc):
        return None
    return ShardReport.model_validate(read_json(loc))


def read_markers(out: str) -> dict[int, ShardReport]:
    """Every done-marker present, by shard index (one listing, then one read each)."""
    parts = locate(out).child(PARTS_DIR)
    reports = {}
    for name in list_names(parts):
        if name.startswith("part-") and name.endswith(".json"):
            report = ShardReport.model_validate(read_json(parts.child(name)))
            reports[report.index] = report
    return reports


def read_manifest(out: str) -> JobManifest | None:
    loc = locate(out).child(MANIFEST)
    return JobManifest.model_validate(read_json(loc)) if exists(loc) else None
