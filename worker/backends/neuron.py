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
tested without hardware (the buckets in ``neuron_buckets``, the graph cache in ``neuron_cache``).
The compiler is a small interface so those tests can substitute a CPU stand-in for the device.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from producer.errors import BadInput
from producer.jobs import JobKind
from producer.settings import env, set_env
from worker.backends.base import Backend, BackendUnavailable, Batch, canonical_dtype
from worker.backends.neuron_buckets import Bucket, BucketGrid, pad_to_bucket
from worker.backends.neuron_cache import ArtifactCache, cache_key, default_cache_root
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the neuron backend needs the AWS Neuron SDK and optimum-neuron: on an inf2/trn1 instance "
    "(or the infra/docker/Dockerfile.neuron image) run "
    "`pip install 'embedfleet[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com`"
)
NEURON_DTYPES = ("float32", "bfloat16", "float16")
_CORES = re.compile(r"^\d+(-\d+)?$")


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
        from worker.models.loading import transformers_only

        # optimum-neuron compiles transformers' classes: the config checks apply, and the native
        # families and a folder's own code are refused; the tensor-by-tensor check of
        # worker.models.loading does not run here (optimum loads the weights itself)
        transformers_only(info, "neuron", remote_code=False)
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


__all__ = ["NeuronBackend", "core_env", "worker_cores", "OptimumNeuronCompiler", "INSTALL_HINT"]
