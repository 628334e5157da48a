"""The torch backend: transformers models on CPU, CUDA or MPS.

The dtype asked for is the dtype the weights are loaded in (no fp32 copy kept around), and
pooling runs on the device so only ``[batch, hidden]`` is copied back.

On CUDA, BERT / RoBERTa / XLM-R embedding models run unpadded (``worker.backends.varlen``:
packed tokens, fused QKV, varlen flash attention, optionally torch.compile'd layers), and the
batch budget is sized to device memory by a start-up profile (``worker.engine.memory``).
Other models, and CPU (where ``torch_cpu.optimize`` applies), keep the padded SDPA path.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from producer.jobs import JobKind
from worker.backends.base import Batch
from worker.engine import memory
from worker.backends.varlen import equal_length_groups
from worker.models.heads import pool, pool_varlen
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but torch sees no Apple GPU here")
    if kind not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"device {device!r} is not one the torch backend runs on (auto, cpu, cuda, mps)")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.startswith("mps"):
            return torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; choose auto, float32, float16 or bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _profile_child(info: ModelInfo, device: str, dtype: str, options: dict, fraction: float) -> None:
    """Entry point of the throwaway profiling process (see ``TorchBackend._profile_in_child``)."""
    logging.basicConfig(level=logging.INFO)
    TorchBackend(info, device, dtype, memory_fraction=fraction, profile="in-process", **options)


DEFAULT_MEMORY_FRACTION = 0.8
#: more tokens per batch than this buys no speed on any GPU measured, only latency
MAX_BATCH_TOKENS = 65536


class TorchBackend:
    """A transformers model on one device, loaded in the dtype asked for.

    ``varlen``: run unpadded (default: on CUDA, for supported embedding models).
    ``fused``: fused Triton/cuBLASLt kernels in the unpadded layers (default: on CUDA; env
    EMBEDFLEET_FUSED). ``approximate_gelu``: let exact-GELU models use cuBLASLt's tanh GELU
    epilogue (default: with ``fused``; env EMBEDFLEET_APPROXIMATE_GELU=0 for exact erf GELU).
    ``dense_groups``: dense (cuDNN) attention over runs of equal-length inputs (default: CUDA).
    ``compile``: torch.compile the unpadded layers instead (default off, env EMBEDFLEET_COMPILE:
    measured slower than the fused eager path on an H100).
    ``memory_fraction``: share of free GPU memory a batch may use (env EMBEDFLEET_MEMORY_FRACTION).
    """

    name = "torch"
    unpadded = False

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto", *,
                 varlen: bool | None = None, compile: bool | None = None, fused: bool | None = None,
                 approximate_gelu: bool | None = None,
                 memory_fraction: float | None = None, max_batch_tokens: int | None = None,
                 profile: bool | str = True, dense_groups: bool | None = None) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        self.info = info
        self.device = pick_device(device)
        self.torch_dtype = pick_dtype(dtype, self.device)
        self.dtype = dtype_name(self.torch_dtype)
        self.cuda = self.device.startswith("cuda")
        self.encoder: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        self._copy_stream = None
        loader = AutoModel if info.kind == JobKind.embed else AutoModelForSequenceClassification
        log.info("loading %s (%s) on %s in %s", info.name, info.architecture, self.device, self.dtype)
        # Loaded on the host first: the unpadded encoder rearranges weights (fused QKV) there,
        # so the GPU never holds two copies.
        model = loader.from_pretrained(str(info.path), dtype=self.torch_dtype, attn_implementation="sdpa").eval()
        want_varlen = varlen if varlen is not None else _env_flag("EMBEDFLEET_VARLEN")
        if want_varlen is None:
            want_varlen = self.cuda
        if want_varlen and info.kind == JobKind.embed:
            from worker.backends.varlen import build_encoder, unsupported_reason

            reason = unsupported_reason(model)
            if reason and varlen:
                raise ValueError(f"varlen=True but {info.name} cannot run unpadded: {reason}")
            if reason:
                log.info("%s runs padded: %s", info.name, reason)
            else:
                self.encoder = build_encoder(model).to_arena(self.device)
                self.unpadded = True
                del model
        if self.encoder is None:
            self.model = model.to(self.device)
            if self.device == "cpu":
                from worker.backends.torch_cpu import optimize

                self.model = optimize(self.model, self.torch_dtype)
            params = inspect.signature(self.model.forward).parameters
            self._takes_type_ids = "token_type_ids" in params
        want_compile = compile if compile is not None else _env_flag("EMBEDFLEET_COMPILE")
        self.compiled = bool(want_compile and self.encoder is not None)
        want_fused = fused if fused is not None else _env_flag("EMBEDFLEET_FUSED")
        self.fused = bool((self.cuda if want_fused is None else want_fused) and self.encoder is not None
                          and not self.compiled)
        approx = approximate_gelu if approximate_gelu is not None else _env_flag("EMBEDFLEET_APPROXIMATE_GELU")
        # On by default with the fused kernels: measured on the bundled model, min cosine to fp32
        # 0.999735 with it and 0.999736 without (bf16 rounding dominates), for ~8% more speed.
        self.approximate_gelu = bool((self.fused if approx is None else approx) and self.fused)
        if self.encoder is not None:
            self.encoder.set_fusion(self.fused, self.approximate_gelu)  # type: ignore[operator]
            dense = dense_groups if dense_groups is not None else _env_flag("EMBEDFLEET_DENSE_GROUPS")
            self.encoder.dense_groups = bool(self.cuda if dense is None else dense)
        if self.compiled:
            self.encoder.enable_compile()  # type: ignore[union-attr,operator]
        #: CUDA runs batches asynchronously to the host, so the engine forms the next ones ahead.
        self.asynchronous = self.cuda
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        self.memory_report = ""
        # On CPU small batches win (cache-resident activations): measured best at 1-4k tokens.
        self.preferred_batch_tokens = 16384 if self.cuda else 2048
        if self.cuda and profile:
            fraction = memory_fraction if memory_fraction is not None else float(
                os.environ.get("EMBEDFLEET_MEMORY_FRACTION", DEFAULT_MEMORY_FRACTION))
            self._options = dict(varlen=varlen, compile=compile, fused=fused, approximate_gelu=approximate_gelu,
                                 dense_groups=dense_groups)
            self.preferred_batch_tokens = self._size_to_memory(fraction, max_batch_tokens or MAX_BATCH_TOKENS,
                                                               in_process=profile == "in-process")

    # ------------------------------------------------------------------ memory
    @property
    def mode(self) -> str:
        mode = "varlen" if self.unpadded else "padded"
        if self.compiled:
            mode += "-compiled"
        if self.fused:
            mode += "-fused" + ("-tanh" if self.approximate_gelu else "")
        return mode

    def synthetic_batch(self, tokens: int, seq_len: int | None = None, seed: int = 0) -> Batch:
        """Random ids filling ``tokens`` in sequences of the model's maximum length (worst case)."""
        seq_len = min(seq_len or self.info.max_length, tokens)
        n = max(1, tokens // seq_len)
        rng = np.random.default_rng(seed)
        vocab = 1000 + 20000
        ids = [rng.integers(1000, vocab, size=seq_len, dtype=np.int32) for _ in range(n)]
        types = [np.zeros(seq_len, dtype=np.int32) for _ in range(n)]
        if self.unpadded:
            return Batch.pack(ids, types)
        stacked = np.stack(ids)
        return Batch(stacked, np.ones_like(stacked), np.stack(types), np.full(n, seq_len, dtype=np.int32))

    def _profile_in_child(self, key: str, fraction: float) -> memory.MemoryProfile | None:
        """Profile in a throwaway process: the kernels, workspaces and allocator segments a
        profile leaves behind die with it, so this process holds only weights until it serves."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        child = context.Process(target=_profile_child, name="ef-memory-profile", daemon=True,
                                args=(self.info, self.device, self.dtype, self._options, fraction))
        try:
            child.start()
            child.join(900)
        except Exception as exc:  # e.g. no way to spawn here: profile in this process instead
            log.warning("memory profile in a child process failed to run (%s); profiling here", exc)
            return None
        if child.is_alive():
            child.kill()
        prof = memory.load_cached(key)
        if prof is None:
            log.warning("memory profile in a child process gave nothing (exit code %s); profiling here",
                        child.exitcode)
        return prof

    def _size_to_memory(self, fraction: float, maximum: int, in_process: bool = False) -> int:
        """Profile (or read the cached profile), then pick the budget and log the start-up report."""
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        name = torch.cuda.get_device_name(self.device)
        key = memory.cache_key(self.info.revision or self.info.name, name, self.dtype, self.mode)
        prof = memory.load_cached(key)
        cached = prof is not None
        if prof is None and not in_process:
            prof = self._profile_in_child(key, fraction)
        if prof is None:
            sizes = memory.next_sizes(min(4096, MAX_BATCH_TOKENS), MAX_BATCH_TOKENS)
            prof = memory.profile_device(lambda t: self.forward(self.synthetic_batch(t)), free * fraction, sizes)
            memory.store_cached(key, prof)
        fixed, per_token = prof.line()
        budget = memory.budget_tokens(free, fraction, fixed, per_token, maximum=maximum)
        self.memory_report = memory.report(budget, free, fraction, prof, cached)
        log.info("%s on %s (%s, %s): %s", self.info.name, name, self.dtype, self.mode, self.memory_report)
        torch.cuda.empty_cache()
        return budget

    # ------------------------------------------------------------------ inputs
    def _padded_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        tensors = {
            "input_ids": torch.from_numpy(batch.input_ids),
            "attention_mask": torch.from_numpy(batch.attention_mask),
        }
        if self._takes_type_ids:
            tensors["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
        out = {}
        for key, value in tensors.items():
            value = value.long()
            if self.cuda:
                value = value.pin_memory()
            out[key] = value.to(self.device, non_blocking=self.cuda)
        return out

    def _packed_host(self, batch: Batch) -> torch.Tensor:
        """One int32 host buffer: ids, type ids, positions, cu_seqlens (a single copy to the device)."""
        total = int(batch.input_ids.shape[0])
        cu = batch.cu_seqlens
        positions = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], batch.lengths)
        host = torch.from_numpy(np.concatenate([batch.input_ids, batch.token_type_ids, positions, cu]).astype(np.int32))
        return host.pin_memory() if self.cuda else host

    def _split_packed(self, flat: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, ...]:
        total = int(batch.input_ids.shape[0])
        ids, types, positions = flat[:total], flat[total:2 * total], flat[2 * total:3 * total]
        return ids, types, positions, flat[3 * total:]

    def stage(self, batch: Batch) -> Any:
        """Copy a packed batch to the GPU on a side stream, so it overlaps the running batch."""
        if not (self.cuda and batch.packed):
            return None
        host = self._packed_host(batch)
        with torch.cuda.stream(self._copy_stream):
            flat = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return flat, event

    def _packed_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        if batch.staged is not None:
            flat, event = batch.staged
            batch.staged = None
            torch.cuda.current_stream().wait_event(event)
            flat.record_stream(torch.cuda.current_stream())
        else:
            flat = self._packed_host(batch).to(self.device, non_blocking=self.cuda)
        return self._split_packed(flat, batch)

    # ------------------------------------------------------------------ forward
    def _widen(self, precise: bool) -> Any:
        """fp16 overflow is what makes NaNs: recompute in bf16's range (autocast keeps weights)."""
        if precise and self.torch_dtype == torch.float16:
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        return self.launch(batch, precise)()

    @torch.inference_mode()
    def launch(self, batch: Batch, precise: bool = False) -> Callable[[], np.ndarray]:
        """Queue the batch on the device and return a function that waits for its outputs.

        The engine's device thread launches the next batch while a post-processing thread
        waits, so the GPU never idles between batches. Running out of memory is raised here
        (allocations happen at launch); other device errors surface when waiting.
        """
        if batch.packed:
            return self._launch_packed(batch, precise)
        if self.model is None:
            raise ValueError("this backend runs unpadded: give it packed batches (Batch.pack)")
        inputs = self._padded_inputs(batch)
        with self._widen(precise):
            if self.info.kind == JobKind.embed:
                hidden = self.model(**inputs).last_hidden_state
                result = pool(hidden, inputs["attention_mask"], self.info.pooling)
            else:
                result = self.model(**inputs).logits
        return self._fetch(result)

    def _fetch(self, result: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start the copy of ``result`` to (pinned) host memory; the returned function waits for it."""
        result = result.float()
        if not self.cuda:
            host = result.numpy()
            return lambda: host
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
        event = torch.cuda.Event()
        event.record()

        def wait() -> np.ndarray:
            event.synchronize()
            return host.numpy()

        return wait

    def _launch_packed(self, batch: Batch, precise: bool) -> Callable[[], np.ndarray]:
        if self.encoder is None:
            raise ValueError("this backend runs padded: give it padded batches")
        ids, types, positions, cu = self._packed_inputs(batch)
        max_len = int(batch.lengths.max())
        groups = equal_length_groups(batch.lengths) if self.encoder.dense_groups else None  # type: ignore[union-attr]
        with self._widen(precise):
            hidden = self.encoder(ids, types, positions, cu, max_len, groups)
            result = pool_varlen(hidden, cu, self.info.pooling)
        return self._fetch(result)

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()

    def close(self) -> None:
        self.model = None
        self.encoder = None
        if self.cuda:
            torch.cuda.empty_cache()
