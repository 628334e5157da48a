"""Every setting that comes from the environment, declared once: name, type, default, meaning.

Why one module: a fleet is configured the same way on every machine, so the environment is
part of embedfleet's interface. Each ``EMBEDFLEET_*`` variable is a field of ``Settings``
(pydantic-settings: typed, validated, one boolean parser), read fresh whenever the environment
changed, and a bad value is an error naming the variable. The other variables embedfleet
honours (AWS endpoints and region, ``HF_HUB_OFFLINE``, ``OMP_NUM_THREADS``, the Neuron runtime's
and AWS Batch's) are read through the functions at the bottom, so no other module touches
``os.environ``. The CLI's options name their variable from here (``Settings.env_name``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.errors import SettingsError

PREFIX = "EMBEDFLEET_"


def _default_cache() -> Path:
    return Path.home() / ".cache" / "embedfleet"


class Settings(BaseSettings):
    """``EMBEDFLEET_<FIELD>`` for each field (the README's configuration table lists them)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", validate_default=True)

    # -- where work goes
    broker: str | None = Field(None, description="Broker URL: redis://, rediss:// or sqs://; none: in-process")
    result_backend: str | None = Field(None, description="Where inline results travel (default: the Redis broker)")
    # -- how a worker runs
    backend: str = Field("auto", description="auto, torch, onnx or neuron")
    dtype: str = Field("auto", description="auto, float32, bfloat16, float16 or int8 (onnx only)")
    memory_fraction: float = Field(0.8, gt=0.0, le=1.0,
                                   description="GPU: share of free memory the profiled batch budget may use")
    devices: str | None = Field(None, description="worker, run, serve: the devices to run one engine each on: 0,1,3 "
                                "(GPUs; 0,0: two on one), cpu:N (the cores split into N), NeuronCores 0-1; "
                                "default: every visible GPU (--device cuda/auto) or NeuronCore (--device neuron)")
    redis_server: str = Field("redis-server", description="run/serve on several devices: the redis-server "
                              "binary (a name on PATH or a path) started as the engines' private host-local broker")
    inline_slots: int = Field(4, ge=1, description="Inline calls in flight beside the shards (worker)")
    shard_lookahead: int | None = Field(None, ge=0, description="Shards a worker reads and tokenizes ahead of "
                                        "the --concurrency it computes, so the next ones wait in the engine "
                                        "while the current ones run and are written (default: as many as "
                                        "--concurrency; 0: none)")
    switch_interval: float | None = Field(None, gt=0, le=1, description="Seconds a thread running Python "
                                          "keeps the interpreter before one waiting for it gets it "
                                          "(sys.setswitchinterval), set when an embedfleet process starts; a "
                                          "GPU engine's threads wait on the device and need it back at once "
                                          "(bench.bulk --variant compares); default: Python's 0.005")
    batches_in_flight: int = Field(2, ge=1, le=16, description="Batches an engine keeps launched on an "
                                   "asynchronous device (GPU) before it waits for the oldest's results; more "
                                   "give slack when the host threads wait for the GIL (bulk jobs), at the cost "
                                   "of an urgent call's wait behind them")
    malloc_keep_mb: int = Field(256, ge=0, le=1 << 20, description="MiB of freed memory an embedfleet process "
                                "keeps for reuse instead of giving it back to the system (glibc's malloc: arrays "
                                "up to 32 MiB come from its heap, which is trimmed only past this), set when the "
                                "process starts, so each request's output array reuses warm pages instead of "
                                "faulting in fresh ones (0.37 page faults a short MiniLM text, ~6 µs each on a "
                                "VM); 0: glibc's own defaults")
    cuda_wait: Literal["spin", "block"] = Field("spin", description="How a GPU engine's post-processing "
                                                "thread waits for a batch's outputs: spin (CUDA's default: "
                                                "it burns a core while the batch runs) or block (it sleeps "
                                                "until the device signals the batch's event)")
    cuda_graphs: bool | None = Field(None, description="Small BERT-path encoders (up to 12 layers x 768) launch "
                                     "packed batches as CUDA graph replays, one per bucket of tokens (~0.5 ms of "
                                     "host time a launch against ~3 ms eager on the H200); unset or true: on where "
                                     "it applies; false: always eager")
    tokenize_processes: int | None = Field(None, ge=0, description="Processes that tokenize beside an engine, "
                                           "so the tokenizer's per-text Python work leaves the engine's GIL "
                                           "(default: all cores but 2 for a GPU engine on 4 or more cores, "
                                           "else 0; 0: the engine's own threads tokenize)")
    stop_grace: int = Field(20, ge=1, description="Seconds after a stop signal before the process exits regardless")
    approximate_gelu: bool = Field(True, description="GPU fast path: tanh GELU fused into the GEMM "
                                   "(0: exact erf GELU, ~10% slower on long texts)")
    torch_compile: bool = Field(False, description="CPU torch backend: torch.compile the model "
                                "(~20% faster, tens of seconds more at start)")
    openvino_streams: int = Field(0, ge=0, description="OpenVINO backend: batches run side by side, each on "
                                  "its share of the cores (0: one per core, at most two)")
    trust_remote_code: bool = Field(False, description="Run the code a model folder ships (its config's "
                                    "auto_map); off: such a folder is refused unless a native family implements it")
    cache: Path = Field(default_factory=_default_cache,
                        validation_alias=AliasChoices(PREFIX + "CACHE", PREFIX + "CACHE_DIR"),
                        description="Cache root: ONNX exports, batch-budget profiles, backend choices, "
                        "Neuron graphs (EMBEDFLEET_CACHE_DIR is read as an old name of it)")
    # -- the fleet's reliability rules
    visibility_timeout: int = Field(3600, ge=1, description="Seconds before an unacknowledged message "
                                    "is delivered again (longer than any shard)")
    max_deliveries: int = Field(3, ge=1, description="Deliveries after which a shard is parked")
    liveness_ttl: int = Field(30, ge=2, description="Redis: seconds a worker's heartbeat lives; the messages "
                              "a worker silent this long held are delivered again (independent of the "
                              "visibility timeout)")
    shard_time_base: float = Field(300.0, gt=0, description="worker: seconds every shard gets before its soft "
                                   "time limit, plus EMBEDFLEET_SHARD_TIME_PER_ROW per row")
    shard_time_per_row: float = Field(0.5, ge=0, description="worker: seconds per row added to a shard's soft "
                                      "time limit")
    shard_time_grace: float = Field(120.0, gt=0, description="worker: seconds past the soft time limit before "
                                    "the hard one (the worker stops itself, the shard's delivery counts)")
    sweep_interval: int = Field(30, ge=1, description="Redis: seconds between checks for shard messages "
                                "the broker lost")
    job_ttl: int = Field(7 * 86400, ge=60, description="Redis: seconds a job's keys (its id -> output record "
                         "for `status <id>`, its shard list) live after submission; none is kept forever")
    storage_roots: str | None = Field(None, description="worker: comma-separated folders or URI prefixes "
                                      "(s3://bucket/prefix/) its messages may read and write; '*' allows anything")
    image_max_pixels: int = Field(40_000_000, ge=1, description="Image inputs: the most pixels (width x height) "
                                  "one image may have before it is decoded (the decompression-bomb limit)")
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Image inputs: the most bytes one encoded "
                                 "image may have (a data URI's payload or a download)")
    image_fetch: bool = Field(True, description="Image inputs: workers download http(s) image URLs (infinity "
                              "does); turn off where workers must not reach URLs their callers name")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Image inputs: seconds to download an "
                                         "http(s) image")
    signing_key: str | None = Field(None, description="Producers sign shard messages with it, workers refuse "
                                    "unsigned or altered ones (HMAC-SHA256 over the message)")
    # -- SQS
    sqs_region: str | None = Field(None, description="SQS region (else AWS_REGION / AWS_DEFAULT_REGION, "
                                   "else us-east-1)")
    sqs_wait: int = Field(10, ge=0, le=20, description="SQS long-polling seconds (SQS allows at most 20)")
    sqs_create_queues: bool = Field(True, description="Create a missing SQS queue with its dead-letter queue")
    # -- the facade
    api_key: str | None = Field(None, description="serve: require 'Authorization: Bearer KEY'")
    # -- Inferentia2
    neuron_cache: str | None = Field(None, description="Compiled Neuron graphs: a folder or s3:// prefix "
                                     "(default: <cache>/neuron)")
    neuron_batch_sizes: str | None = Field(None, description="Neuron batch buckets, e.g. 1,4,8,16,32")
    neuron_seq_lens: str | None = Field(None, description="Neuron sequence buckets, e.g. 64,128,256,512")
    # -- array jobs
    job_manifest: str | None = Field(None, description="shard: the job's _job.json (or its folder)")
    index_offset: int = Field(0, ge=0, description="shard: added to the array index")
    shard_attempts: int = Field(1, ge=1, description="shard: the attempts AWS Batch gives a child (the job "
                                "definition's RetryStrategy, retrying exit 75); a transient failure on the last "
                                "fails the shard in its marker, with the reason")

    @classmethod
    def env_name(cls, field: str) -> str:
        """The variable a field is read from (for CLI options that show it)."""
        if field not in cls.model_fields:
            raise KeyError(f"no setting {field!r}")
        return PREFIX + field.upper()


def _snapshot() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(PREFIX)))


@lru_cache(maxsize=8)
def _load(snapshot: tuple[tuple[str, str], ...]) -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_explain(exc, dict(snapshot))) from None


def _explain(exc: ValidationError, values: dict[str, str]) -> str:
    """``NAME='value': why`` for each bad variable."""
    parts = []
    for error in exc.errors():
        field = str(error.get("loc", ("?",))[0])
        name = field.upper() if field.upper().startswith(PREFIX) else PREFIX + field.upper()
        raw = next((v for k, v in values.items() if k.upper() == name), None)
        parts.append(f"{name}={raw!r}: {error.get('msg')}")
    return "; ".join(parts)


def settings() -> Settings:
    """The settings as the environment says now (re-read only when an ``EMBEDFLEET_*`` changed)."""
    return _load(_snapshot())


def cache_dir(*parts: str) -> Path:
    """A folder under the one cache root."""
    return settings().cache.expanduser().joinpath(*parts)


# ---------------------------------------------------------------------------- other variables
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def flag(raw: str | None, name: str = "value") -> bool:
    """The one boolean parser for variables outside ``Settings`` (``1/true/yes/on``, ``0/false/no/off``)."""
    if raw is None or not raw.strip():
        return False
    try:
        return _BOOL.validate_python(raw.strip())
    except ValidationError:
        raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)") from None


def env(name: str) -> str | None:
    """A variable embedfleet honours but does not own (AWS_*, HF_HUB_OFFLINE, NEURON_RT_*, ...)."""
    value = os.environ.get(name)
    return value if value is None or value.strip() else None


def set_env(name: str, value: str, *, overwrite: bool = True) -> None:
    """Set a variable for libraries that read it themselves (the Neuron runtime, tokenizers)."""
    if overwrite or name not in os.environ:
        os.environ[name] = value


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless it is set: must run before torch is imported.

    OpenMP's default lets each of torch's intra-op threads spin after every parallel region,
    and every region waits for all of them. When anything else shares the cores (the facade's
    event loop, the tokenizer, another process) a spinning or descheduled thread stalls every
    operator: measured on a shared 2-core machine, one MiniLM text took 840-1,056 ms and 400-560 ms
    of CPU with spinning, 20-38 ms and 15 ms passive; 64 clients 32-48 vs 96-192 requests/s
    (bench/RESULTS.md, issue 20). Set ``OMP_WAIT_POLICY=ACTIVE`` to spin on a dedicated machine.
    """
    set_env("OMP_WAIT_POLICY", "PASSIVE", overwrite=False)


def use_switch_interval() -> None:
    """``sys.setswitchinterval`` from ``EMBEDFLEET_SWITCH_INTERVAL`` when it is set (else Python's 5 ms).

    Process-wide, so it is applied where a process starts (the ``embedfleet`` CLI, an engine
    process), not by each engine. Why it may matter: a GPU engine's device, preparer and
    post-processing threads wait (for the device, for a batch) and need the GIL back at once,
    while a bulk job's shard tasks run Python beside them; a waiting thread gets it only after
    the interval. Measured on the H200 (bench.bulk, MiniLM 100k, same rounds): 1 ms gave the fleet
    2.834 / 2.932 s against 3.004 / 3.397 s with Python's 5 ms on 9482179, but 3.261 s against
    2.925 s (67.6% against 75.4% of bare) after the mean-pooling change (bench/RESULTS.md, stop 26),
    so the default stays Python's.
    """
    import sys

    try:
        chosen = settings().switch_interval
    except SettingsError:  # a bad EMBEDFLEET_* value: the command reports it (one line, its exit code)
        return
    if chosen is not None:
        sys.setswitchinterval(chosen)


#: glibc's ``mallopt`` parameters, and the largest allocation it lets come from the heap (its limit on 64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_MAX = -1, -3, 32 << 20


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep up to ``EMBEDFLEET_MALLOC_KEEP_MB`` of freed memory for reuse; True if applied.

    Why: an engine gives every request a new output array (a short-text request of 2,000 MiniLM
    rows: 3 MB), and glibc serves such sizes by ``mmap`` or trims them from its heap's top once
    freed, so the next request's array is fresh pages that the post-processing thread faults in
    one by one: 0.37 faults a short text, 6 µs each on this project's VMs, about a fifth of the
    engine process's CPU a text with the device taken out (bench/host.py ``--backends
    null-async``). With the heap kept, a freed array's pages are reused warm. The cost is that a
    process's memory does not shrink below what it last used, up to the amount kept. Process-wide
    and applied where a process starts (the ``embedfleet`` CLI, an engine process); nothing
    happens off glibc (musl, macOS) or with 0.
    """
    try:
        keep = settings().malloc_keep_mb
    except SettingsError:  # a bad EMBEDFLEET_* value: the command reports it (one line, its exit code)
        return False
    if not keep:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts these and does nothing
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, keep << 20))


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE``: resolve hub ids from the local cache only."""
    return flag(env("HF_HUB_OFFLINE"), "HF_HUB_OFFLINE")


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is a positive integer (it overrides the cores counted)."""
    raw = env("OMP_NUM_THREADS")
    return int(raw) if raw and raw.isdigit() and int(raw) > 0 else None


def aws_endpoint(service: str) -> str | None:
    """``AWS_ENDPOINT_URL_<SERVICE>`` or ``AWS_ENDPOINT_URL`` (moto, MinIO, LocalStack)."""
    return env(f"AWS_ENDPOINT_URL_{service.upper()}") or env("AWS_ENDPOINT_URL")


def aws_region() -> str | None:
    return env("AWS_REGION") or env("AWS_DEFAULT_REGION")


def sqs_region() -> str:
    return settings().sqs_region or aws_region() or "us-east-1"


def aws_identity() -> tuple[str | None, ...]:
    """What an AWS client is bound to (endpoint, region, credentials), to key shared clients by."""
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_PROFILE")
    return tuple(env(name) for name in names)


def environment() -> dict[str, str]:
    """A copy of the whole environment, for starting a child process with it."""
    return dict(os.environ)


def described() -> list[dict[str, Any]]:
    """Each setting with its variable, default and meaning (for the README's table and --help)."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append({"variable": Settings.env_name(name), "default": default, "meaning": field.description or ""})
    return rows
