"""What a broker message may make a worker read and write: the storage roots and the job binding.

Why: a shard message names a source URI and an output folder, and anyone who can write to the
broker can send one. Before this check, ``uri: /etc/passwd`` was read into a Parquet part,
``out: .../../escape`` wrote outside, and an index past a job's end wrote into another job's
finished folder. So a shard is run only if

* every path it names resolves inside one of the worker's storage roots (``--storage-root``,
  ``EMBEDFLEET_STORAGE_ROOTS``): local folders, compared after normalizing and resolving symlinks,
  or URI prefixes such as ``s3://bucket/prefix/``; a ``..`` segment is refused outright; ``*`` allows
  everything (the worker warns);
* its output folder's ``_job.json`` (written by the producer before any shard was sent) is the
  same job and plans this very shard: same id, model, kind, columns, options, source range.

A refused message is acknowledged and logged, and nothing is read or written where it points.
Whether its job learns of it depends on what the producer recorded (``worker.hosting.tasks.refuse``):
the job's own shard ends failed with the reason; a message that differs from it is dropped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.errors import EmbedfleetError, Untrusted
from producer.jobs import JobSpec, ShardJob
from producer.storage import read_job
from worker.hosting.per_app import attached

log = logging.getLogger(__name__)

ANY = "*"


def _is_uri(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def _local(value: str) -> str:
    return value[len("file://"):] if value.startswith("file://") else value


def _segments(value: str) -> list[str]:
    return _local(value.split("://", 1)[1] if _is_uri(value) else value).split("/")


@dataclass(frozen=True)
class StorageRoots:
    """The places a worker's messages may name; build with ``StorageRoots.parse``."""

    folders: tuple[Path, ...] = ()
    prefixes: tuple[str, ...] = ()
    anything: bool = False

    @classmethod
    def parse(cls, roots: list[str]) -> "StorageRoots":
        """Folders are resolved now (symlinks included); a prefix gains a trailing ``/``."""
        roots = [r.strip() for raw in roots for r in raw.split(",") if r.strip()]
        if ANY in roots:
            return cls(anything=True)
        for root in roots:
            if ".." in _segments(root):
                raise Untrusted(f"storage root {root!r} contains '..'", param="storage_root")
        folders = tuple(Path(_local(r)).expanduser().resolve() for r in roots if not _is_uri(r))
        prefixes = tuple(r if r.endswith("/") else r + "/" for r in roots if _is_uri(r))
        return cls(folders, prefixes)

    @property
    def empty(self) -> bool:
        return not (self.anything or self.folders or self.prefixes)

    def describe(self) -> str:
        if self.anything:
            return "anywhere ('*')"
        return ", ".join([str(f) for f in self.folders] + list(self.prefixes)) or "nowhere"

    def refusal(self, value: str) -> str | None:
        """Why ``value`` may not be touched, or ``None`` when it lies inside a root."""
        if self.anything:
            return None
        if ".." in _segments(value):
            return f"{value!r} contains '..'"
        if _is_uri(value):
            candidate = value if value.endswith("/") else value + "/"
            if any(candidate.startswith(prefix) for prefix in self.prefixes):
                return None
        else:
            path = Path(os.path.abspath(_local(value))).resolve()
            if any(path == folder or path.is_relative_to(folder) for folder in self.folders):
                return None
        return f"{value!r} is outside the worker's storage roots ({self.describe()})"


def check_shard(job: ShardJob, roots: StorageRoots) -> None:
    """Raise ``Untrusted`` unless the shard's source and output lie in ``roots`` and its output
    folder's ``_job.json`` plans this shard of this job."""
    reason = roots.refusal(job.shard.uri)
    if reason:
        raise Untrusted(f"shard.uri: {reason}", param="shard.uri")
    check_output(job, roots)


def check_output(job: ShardJob, roots: StorageRoots) -> None:
    """Raise ``Untrusted`` unless the shard's output lies in ``roots`` and its ``_job.json`` plans
    this very shard (source and row range included). Passing this, the message is the job's own
    planned shard, so its failure may be written there even when its source is refused
    (``worker.hosting.tasks.refuse``)."""
    reason = roots.refusal(job.out)
    if reason:
        raise Untrusted(f"out: {reason}", param="out")
    try:
        spec = read_job(job.out)
    except EmbedfleetError as exc:
        raise Untrusted(f"out: {job.out!r} holds no readable _job.json ({exc})", param="out") from None
    except (OSError, ValueError) as exc:
        raise Untrusted(f"out: {job.out!r} holds no readable _job.json ({type(exc).__name__})", param="out") from None
    mismatch = _mismatch(job, spec)
    if mismatch:
        raise Untrusted(f"the message does not match the job in {job.out!r}: {mismatch}", param=mismatch.split(" ")[0])


def _mismatch(job: ShardJob, spec: JobSpec) -> str | None:
    """The first field where the message departs from the job its output folder holds."""
    if job.job_id != spec.job_id:
        return f"job_id {job.job_id!r} (the folder belongs to job {spec.job_id!r})"
    pairs = (("kind", job.kind, spec.kind), ("model", job.model, spec.model), ("columns", job.columns, spec.columns),
             ("options", job.options, spec.options), ("n_shards", job.n_shards, len(spec.shards)))
    for name, got, want in pairs:
        if got != want:
            return f"{name} differs from _job.json"
    if job.shard.index >= len(spec.shards):
        return f"shard.index {job.shard.index} (the job has {len(spec.shards)} shards)"
    if job.shard != spec.shards[job.shard.index]:
        return f"shard {job.shard.index} differs from _job.json (source or row range)"
    return None


#: the attribute of a Celery app that holds its worker's roots
_APP_ATTRIBUTE = "embedfleet_storage_roots"


@dataclass
class _WorkerRoots:
    """The roots one worker enforces, kept on its app (``worker.hosting.per_app``); ``None`` until set."""

    roots: StorageRoots | None = None


def use_roots(app: Any, roots: StorageRoots | None) -> None:
    """The roots the shard tasks of the worker running ``app`` enforce (set by the worker before
    it consumes); ``None`` checks nothing (engines hosted by code that sends no broker messages).

    Per worker, not per process: an embedded ``serve`` (roots: "nowhere") started after an
    ``embedfleet run`` in the same process made every shard of the run refused (stop 27)."""
    attached(app, _APP_ATTRIBUTE, _WorkerRoots).roots = roots


def roots_of(app: Any) -> StorageRoots | None:
    """The roots of the worker running ``app``; ``None`` (nothing checked) for an app no worker set."""
    return attached(app, _APP_ATTRIBUTE, _WorkerRoots).roots
