"""Compiled Neuron graphs by key, in a local folder or under an s3:// prefix, so one worker
compiles a bucket and the fleet reuses it. The key holds everything that changes a graph
(model revision, task, bucket, dtype, compiler versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import pyarrow.fs as pafs

from producer import storage
from producer.jobs import JobKind, model_slug
from producer.settings import cache_dir, settings
from worker.backends.neuron_buckets import Bucket
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"


def cache_key(info: ModelInfo, bucket: Bucket, dtype: str, versions: Mapping[str, str]) -> str:
    """A name for one compiled graph: readable prefix, digest of everything that changes it.

    The model revision (a hash of its files), the task, the bucket, the dtype and the compiler
    versions all change the compiled graph; a graph from another SDK may not even load.
    """
    task = "feature-extraction" if info.kind == JobKind.embed else "text-classification"
    facts = {"revision": info.revision, "architecture": info.architecture, "task": task,
             "batch": bucket.batch, "seq": bucket.seq, "dtype": dtype, "versions": dict(sorted(versions.items()))}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_slug(info.name)}-{task}-b{bucket.batch}-s{bucket.seq}-{dtype}-{digest}"


def default_cache_root() -> str:
    """``EMBEDFLEET_NEURON_CACHE`` (a folder or s3:// prefix), else ``<cache>/neuron``."""
    return settings().neuron_cache or str(cache_dir("neuron"))


class ArtifactCache:
    """Compiled graphs by key, in a local folder or under an s3:// prefix.

    An entry counts only once its ``_COMPLETE`` marker exists, and the marker is written after
    every file: a worker killed mid-upload leaves an entry others ignore and overwrite.
    """

    def __init__(self, root: str, local_root: str | None = None) -> None:
        self.root = storage.locate(root)
        if self.root.is_local:
            self.local_root = Path(self.root.path)
        else:  # graphs are loaded from local disk; S3 is where the fleet shares them
            self.local_root = Path(local_root) if local_root else cache_dir("neuron-from-s3")

    def local_dir(self, key: str) -> Path:
        """Where the graph ``key`` lives on this machine (loaded from here)."""
        return self.local_root / key

    def has_local(self, key: str) -> bool:
        return (self.local_dir(key) / COMPLETE).is_file()

    def fetch(self, key: str) -> bool:
        """Make ``key`` available locally; False when no complete entry exists anywhere."""
        if self.has_local(key):
            return True
        if self.root.is_local:
            return False
        remote = self.root.child(key)
        if not storage.exists(remote.child(COMPLETE)):
            return False
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self._ensure_local_root()))
        pafs.copy_files(remote.path, str(staging), source_filesystem=remote.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        self._move_into_place(staging, key)
        log.info("neuron graph %s fetched from %s", key, remote.uri)
        return True

    def store(self, key: str, compiled: Path) -> None:
        """Publish a freshly compiled folder under ``key`` (locally, and on S3 when remote)."""
        (compiled / COMPLETE).write_text(json.dumps({"key": key}))
        if not self.root.is_local:
            remote = self.root.child(key)
            for path in sorted(p for p in compiled.rglob("*") if p.is_file() and p.name != COMPLETE):
                storage.publish_bytes(remote.child(path.relative_to(compiled).as_posix()), path.read_bytes())
            storage.publish_bytes(remote.child(COMPLETE), (compiled / COMPLETE).read_bytes())
            log.info("neuron graph %s stored in %s", key, remote.uri)
        self._move_into_place(compiled, key)

    def staging_dir(self, key: str) -> Path:
        """An empty folder next to the cache to compile into (same filesystem: rename is atomic)."""
        return Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self._ensure_local_root()))

    def _ensure_local_root(self) -> Path:
        self.local_root.mkdir(parents=True, exist_ok=True)
        return self.local_root

    def _move_into_place(self, staging: Path, key: str) -> None:
        target = self.local_dir(key)
        if target.exists() and not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a half-written entry from a killed worker
        try:
            os.replace(staging, target)
        except OSError:  # another process published the same key first: theirs is as good
            shutil.rmtree(staging, ignore_errors=True)
