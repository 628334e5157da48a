"""The neuron backend: optimum-neuron models on AWS Inferentia2 / Trainium NeuronCores.

Neuron graphs are compiled ahead of time for static shapes, so this backend:

* compiles one graph per (batch, sequence) **bucket** of a small grid, lazily on first use;
* pads every batch up to the smallest bucket that holds it (rows and tokens; extra rows are
  thrown away after the forward pass) and splits batches larger than the largest bucket;
* caches compiled artifacts under a key made of everything that changes the graph (model
  revision, task, bucket, dtype, compiler versions), in a local folder or on S3
  (``EMBEDFLEET_NEURON_CACHE=s3://bucket/prefix``), so one worker compiles and the fleet reuses;
* runs one worker per NeuronCore: ``--device neuron:N`` pins the process to core N
  (``NEURON_RT_VISIBLE_CORES``); plain ``neuron`` asks the runtime for one free core
  (``NEURON_RT_NUM_CORES=1``), so two processes can share an inf2.xlarge.

optimum-neuron is imported only when a backend is built: without the Neuron SDK the worker
says what to install, and everything above except the compile/run step is plain Python that is
tested without hardware. The compiler is a small interface so those tests can substitute a CPU
stand-in for the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import pyarrow.fs as pafs

from producer import storage
from producer.errors import BadInput
from producer.jobs import JobKind, model_slug
from producer.settings import cache_dir, env, set_env, settings
from worker.backends.base import Backend, BackendUnavailable, Batch, canonical_dtype
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the neuron backend needs the AWS Neuron SDK and optimum-neuron: on an inf2/trn1 instance "
    "(or the infra/docker/Dockerfile.neuron image) run "
    "`pip install 'embedfleet[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com`"
)
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
DEFAULT_SEQ_LENS = (64, 128, 256, 512)
BATCH_SIZES_ENV = "EMBEDFLEET_NEURON_BATCH_SIZES"
SEQ_LENS_ENV = "EMBEDFLEET_NEURON_SEQ_LENS"
CACHE_ENV = "EMBEDFLEET_NEURON_CACHE"
COMPLETE = "_COMPLETE"
NEURON_DTYPES = ("float32", "bfloat16", "float16")
_CORES = re.compile(r"^\d+(-\d+)?$")


# ---------------------------------------------------------------------------- buckets
@dataclass(frozen=True, order=True)
class Bucket:
    """One compiled static shape: ``batch`` rows of ``seq`` tokens."""

    batch: int
    seq: int


@dataclass(frozen=True)
class BucketGrid:
    """The shapes compiled for a model; a batch runs in the smallest bucket that holds it."""

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, values in (("batch sizes", self.batch_sizes), ("sequence lengths", self.seq_lens)):
            if not values or any(v < 1 for v in values):
                raise BadInput(f"neuron bucket {name} must be positive integers, got {list(values)}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))
        object.__setattr__(self, "seq_lens", tuple(sorted(set(self.seq_lens))))

    @classmethod
    def for_model(cls, max_length: int, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                  seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS) -> "BucketGrid":
        """Sequence buckets up to the model's maximum length, which is always a bucket itself.

        Inputs are truncated to ``max_length`` before they get here, so the grid must reach it,
        and compiling buckets longer than the model accepts would waste compile time.
        """
        lens = tuple(s for s in seq_lens if s < max_length) + (max_length,)
        return cls(tuple(batch_sizes), lens)

    @classmethod
    def from_env(cls, max_length: int, environ: Mapping[str, str] | None = None) -> "BucketGrid":
        """The grid from the settings ``EMBEDFLEET_NEURON_BATCH_SIZES`` / ``_SEQ_LENS`` (or the
        mapping given, for tests), else the defaults."""
        if environ is None:
            batch_raw, seq_raw = settings().neuron_batch_sizes, settings().neuron_seq_lens
        else:
            batch_raw, seq_raw = environ.get(BATCH_SIZES_ENV), environ.get(SEQ_LENS_ENV)
        batches = _int_list(batch_raw, BATCH_SIZES_ENV) or DEFAULT_BATCH_SIZES
        lens = _int_list(seq_raw, SEQ_LENS_ENV) or DEFAULT_SEQ_LENS
        return cls.for_model(max_length, batches, lens)

    @property
    def largest(self) -> Bucket:
        return Bucket(self.batch_sizes[-1], self.seq_lens[-1])

    def choose(self, n_rows: int, longest: int) -> Bucket:
        """The smallest bucket for ``n_rows`` inputs of at most ``longest`` tokens.

        More rows than the largest batch bucket get the largest one; ``plan`` splits them.
        """
        if n_rows < 1:
            raise ValueError(f"a batch needs at least one row, got {n_rows}")
        seq = next((s for s in self.seq_lens if s >= longest), None)
        if seq is None:
            raise BadInput(
                f"an input of {longest} tokens is longer than the largest compiled sequence bucket "
                f"({self.seq_lens[-1]}); add a larger one to {SEQ_LENS_ENV}"
            )
        batch = next((b for b in self.batch_sizes if b >= n_rows), self.batch_sizes[-1])
        return Bucket(batch, seq)

    def plan(self, lengths: np.ndarray) -> list[tuple[slice, Bucket]]:
        """Split a batch into row ranges that each fit one bucket (sequence bucket chosen per range)."""
        out = []
        step = self.batch_sizes[-1]
        for start in range(0, len(lengths), step):
            rows = slice(start, min(start + step, len(lengths)))
            chunk = lengths[rows]
            out.append((rows, self.choose(len(chunk), int(chunk.max()))))
        return out


def _int_list(raw: str | None, name: str) -> tuple[int, ...]:
    if raw is None or not raw.strip():
        return ()
    try:
        values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise BadInput(f"{name}={raw!r}: give comma-separated positive integers, e.g. 1,8,32") from None
    if not values or any(v < 1 for v in values):
        raise BadInput(f"{name}={raw!r}: give comma-separated positive integers, e.g. 1,8,32")
    return values


def pad_to_bucket(batch: Batch, rows: slice, bucket: Bucket, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The inputs of ``batch[rows]`` padded to exactly ``bucket``'s shape (int64, as traced).

    Filler rows get one unmasked pad token rather than none: a fully masked row makes the
    attention softmax divide by zero on some compilers, and their outputs are dropped anyway.
    """
    # The batch is padded to its longest row; a chunk of it needs only its own longest.
    width = int(batch.lengths[rows].max())
    ids = batch.input_ids[rows, :width]
    n = ids.shape[0]
    if n > bucket.batch or width > bucket.seq:
        raise ValueError(f"a batch of {n}x{width} does not fit bucket {bucket.batch}x{bucket.seq}")
    shape = (bucket.batch, bucket.seq)
    out = {
        "input_ids": np.full(shape, pad_id, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
        "token_type_ids": np.zeros(shape, dtype=np.int64),
    }
    out["input_ids"][:n, :width] = ids
    out["attention_mask"][:n, :width] = batch.attention_mask[rows, :width]
    out["token_type_ids"][:n, :width] = batch.token_type_ids[rows, :width]
    out["attention_mask"][n:, 0] = 1
    return out


# ---------------------------------------------------------------------------- cache
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


# ---------------------------------------------------------------------------- cores
def core_env(device: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Runtime variables that give this process its NeuronCore(s); set before the runtime starts.

    ``neuron:N`` or ``neuron:A-B`` pins cores (``NEURON_RT_VISIBLE_CORES``); ``neuron``/``auto``
    keeps what the environment already says, else asks for one free core, because by default
    the runtime reserves every core and a second worker on the instance could not start.
    """
    def get(key: str) -> str | None:
        return env(key) if environ is None else environ.get(key)

    name, _, cores = device.partition(":")
    if name not in ("neuron", "auto"):
        raise BadInput(f"device {device!r} is not one the neuron backend runs on (auto, neuron, neuron:N, neuron:A-B)")
    if cores:
        if not _CORES.match(cores):
            raise BadInput(f"device {device!r}: the core must be a number or a range like 0-1")
        current = get("NEURON_RT_VISIBLE_CORES")
        if current and current != cores:
            raise BadInput(f"device {device!r} conflicts with NEURON_RT_VISIBLE_CORES={current}")
        return {"NEURON_RT_VISIBLE_CORES": cores}
    if get("NEURON_RT_VISIBLE_CORES") or get("NEURON_RT_NUM_CORES"):
        return {}
    return {"NEURON_RT_NUM_CORES": "1"}


def worker_cores(total_cores: int, cores_per_worker: int = 1) -> list[str]:
    """``NEURON_RT_VISIBLE_CORES`` for each worker of an instance: one worker per core (or group)."""
    if total_cores < 1 or cores_per_worker < 1:
        raise BadInput("total_cores and cores_per_worker must be at least 1")
    if total_cores % cores_per_worker:
        raise BadInput(f"{total_cores} NeuronCores do not split into groups of {cores_per_worker}")
    if cores_per_worker == 1:
        return [str(i) for i in range(total_cores)]
    return [f"{i}-{i + cores_per_worker - 1}" for i in range(0, total_cores, cores_per_worker)]


# ---------------------------------------------------------------------------- compiler
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class Compiler(Protocol):
    """Compile a model for one bucket into a folder, and load such a folder for inference."""

    def versions(self) -> dict[str, str]:
        ...

    def compile(self, info: ModelInfo, bucket: Bucket, dtype: str, dest: Path) -> None:
        ...

    def load(self, info: ModelInfo, path: Path) -> Runner:
        """A function from padded int64 inputs to ``last_hidden_state`` (embed) or logits."""
        ...


class OptimumNeuronCompiler:
    """optimum-neuron's export (neuronx-cc) and its Neuron models; needs the Neuron SDK."""

    def __init__(self) -> None:
        try:
            import optimum.neuron as optimum_neuron  # noqa: F401
            import torch_neuronx  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"{INSTALL_HINT} (missing: {exc.name})") from exc
        self._module = optimum_neuron

    def versions(self) -> dict[str, str]:
        found = {}
        for package in ("optimum-neuron", "neuronx-cc", "torch-neuronx"):
            try:
                found[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                found[package] = "absent"
        return found

    def _model_class(self, info: ModelInfo) -> Any:
        if info.kind == JobKind.embed:
            return self._module.NeuronModelForFeatureExtraction
        return self._module.NeuronModelForSequenceClassification

    def compile(self, info: ModelInfo, bucket: Bucket, dtype: str, dest: Path) -> None:
        cast = {"float32": {"auto_cast": None}, "bfloat16": {"auto_cast": "matmul", "auto_cast_type": "bf16"},
                "float16": {"auto_cast": "matmul", "auto_cast_type": "fp16"}}[dtype]
        model = self._model_class(info).from_pretrained(
            str(info.path), export=True, batch_size=bucket.batch, sequence_length=bucket.seq, **cast
        )
        model.save_pretrained(str(dest))

    def load(self, info: ModelInfo, path: Path) -> Runner:
        import torch

        model = self._model_class(info).from_pretrained(str(path))
        embed = info.kind == JobKind.embed

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
            with torch.inference_mode():
                output = model(**tensors)
            result = output.last_hidden_state if embed else output.logits
            return result.float().cpu().numpy()

        return run


# ---------------------------------------------------------------------------- backend
class NeuronBackend(Backend):
    """A model on one NeuronCore, compiled per bucket, padded to the bucket at run time."""

    name = "neuron"
    unpadded = False

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto",
                 compiler: Compiler | None = None, grid: BucketGrid | None = None,
                 cache_root: str | None = None) -> None:
        name = canonical_dtype(dtype, NEURON_DTYPES, backend="neuron")
        cores_env = core_env(device)
        self.compiler: Compiler = compiler if compiler is not None else OptimumNeuronCompiler()
        for key, value in cores_env.items():  # before the first model load starts the Neuron runtime
            set_env(key, value)
        self.info = info
        self.dtype = "bfloat16" if name == "auto" else name
        cores = env("NEURON_RT_VISIBLE_CORES") or f"any {env('NEURON_RT_NUM_CORES') or 'all'}"
        self.device = f"neuron ({cores})"
        self.grid = grid or BucketGrid.from_env(info.max_length)
        self.cache = ArtifactCache(cache_root or default_cache_root())
        self.pad_id = _pad_id(info.path)
        largest = self.grid.largest
        self.preferred_batch_tokens = largest.batch * largest.seq
        self._versions = self.compiler.versions()
        self._runners: dict[tuple[Bucket, str], Runner] = {}
        self._lock = threading.Lock()
        self.compiled: list[str] = []

    def key(self, bucket: Bucket, dtype: str | None = None) -> str:
        return cache_key(self.info, bucket, dtype or self.dtype, self._versions)

    def runner(self, bucket: Bucket, dtype: str | None = None) -> Runner:
        """The loaded graph for ``bucket``: from memory, the cache, or compiled now (then cached)."""
        dtype = dtype or self.dtype
        with self._lock:
            found = self._runners.get((bucket, dtype))
            if found is None:
                found = self.compiler.load(self.info, self._materialize(bucket, dtype))
                self._runners[(bucket, dtype)] = found
            return found

    def _materialize(self, bucket: Bucket, dtype: str) -> Path:
        key = self.key(bucket, dtype)
        if not self.cache.fetch(key):
            log.warning("compiling %s for bucket %dx%d in %s (minutes on first use; cached after)",
                        self.info.name, bucket.batch, bucket.seq, dtype)
            staging = self.cache.staging_dir(key)
            try:
                self.compiler.compile(self.info, bucket, dtype, staging)
                self.cache.store(key, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.compiled.append(key)
        return self.cache.local_dir(key)

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        dtype = "float32" if precise else self.dtype
        parts = []
        for rows, bucket in self.grid.plan(batch.lengths):
            inputs = pad_to_bucket(batch, rows, bucket, self.pad_id)
            n = rows.stop - rows.start
            raw = self.runner(bucket, dtype)(inputs)[:n]
            if self.info.kind == JobKind.embed:
                raw = self._pool(raw, inputs["attention_mask"][:n])
            parts.append(np.asarray(raw, dtype=np.float32))
        return np.concatenate(parts, axis=0)

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        from worker.models.heads import pool

        return pool(torch.from_numpy(hidden), torch.from_numpy(mask), self.info.pooling).float().numpy()

    def is_out_of_memory(self, error: BaseException) -> bool:
        text = str(error).lower()
        return "out of memory" in text or "nrt_resource" in text

    def close(self) -> None:
        with self._lock:
            self._runners.clear()


def _pad_id(path: Path) -> int:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    value = config.get("pad_token_id")
    return int(value) if isinstance(value, int) else 0


__all__ = ["NeuronBackend", "Bucket", "BucketGrid", "ArtifactCache", "pad_to_bucket", "cache_key", "core_env",
           "worker_cores", "OptimumNeuronCompiler", "INSTALL_HINT"]
