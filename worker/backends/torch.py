"""The torch backend: transformers models on CPU, CUDA or MPS.

The dtype asked for is the dtype the weights are loaded in (no fp32 copy kept around), and
pooling runs on the device so only ``[batch, hidden]`` is copied back.

On CUDA, BERT / RoBERTa / XLM-R embedding models run unpadded (``worker.backends.varlen``:
packed tokens, fused QKV, varlen flash attention, fused bias+LayerNorm and GELU epilogues), and
so do Qwen3 decoder embedders (``worker.backends.decoder``: causal varlen flash, GQA, RoPE).
Other models, and CPU (where ``torch_cpu.optimize`` applies), keep the padded SDPA path. The
batch budget on a GPU is sized by ``worker.engine.memory`` through ``memory_device``.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from producer.errors import BadInput
from producer.jobs import JobKind
from producer.settings import settings
from producer.outputs import DENSE_ONLY
from worker.backends.base import Backend, Batch, BatchOutputs, MemoryDevice, canonical_dtype
from worker.backends.decoder import DecoderEncoder
from worker.backends.varlen import GraphedEncoder, equal_length_groups, flash_available, move_to_arena
from worker.models import bge_m3, splade, vision
from worker.models.heads import pool, pool_varlen
from worker.models.loading import load_model
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: layers x hidden size up to which the BERT path runs in CUDA graphs by default (bge-base: 12 x 768). On by
#: default since stop 27's H200 calls on 141b2d1: the graph GPU tests passed (replays = eager, no sync in a
#: launch), the graphed bf16 engine's per-vector cosine to fp32 on the bundled model was >= 0.99970 (bar
#: 0.999), and bulk MiniLM 100k through Redis + Parquet ran 4.79M tokens/s against 4.23M eager, same rounds
GRAPH_MAX_WIDTH = 12 * 768
#: equal-length run shapes remembered for dense attention (each one costs a cuDNN plan once)
DENSE_SHAPES = 64

#: canonical dtype names (``worker.backends.base.DTYPES``) to torch's
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        raise BadInput("device 'cuda' asked for, but torch sees no CUDA GPU here", param="device")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput("device 'mps' asked for, but torch sees no Apple GPU here", param="device")
    if kind not in {"cpu", "cuda", "mps"}:
        raise BadInput(f"device {device!r} is not one the torch backend runs on (auto, cpu, cuda, mps)", param="device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU."""
    name = canonical_dtype(dtype, tuple(TORCH_DTYPES), backend="torch")
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.startswith("mps"):
            return torch.float16
        return torch.float32
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in TORCH_DTYPES.items()}[dtype]


def _to_arena(encoder: torch.nn.Module, heads: torch.nn.Module | None, device: str) -> torch.nn.Module:
    """The unpadded encoder's weights and bge-m3's heads in one device allocation, then the buffers.

    Why the heads too: on their own, the caching allocator gives ColBERT's 2 MiB weight a 20 MiB
    segment (sizes between 1 and 10 MiB get one) and the biases a 2 MiB one, so three outputs
    would hold ~20 MiB more than the weights after load; inside the arena they take their size.
    """
    modules = torch.nn.ModuleList([encoder] + ([heads] if heads is not None else []))
    move_to_arena(modules, device)
    modules.to(device)  # the buffers (position ids); every weight is already there
    return encoder


class CudaMemory:
    """One CUDA device's memory, as ``worker.engine.memory`` measures it."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.name = torch.cuda.get_device_name(self.device)

    def free_bytes(self) -> int:
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(self.device)[0])

    def reset_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError)

    def release(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


class TorchBackend(Backend):
    """A transformers model on one device, loaded in the dtype asked for.

    The switches below choose between fast paths; their defaults are what the benchmarks found
    fastest (bench/ passes them to compare):
    ``varlen``: run unpadded (default: on CUDA, for supported embedding models).
    ``fused``: fused Triton/cuBLASLt kernels in the unpadded layers (default: on CUDA).
    ``approximate_gelu``: let exact-GELU models use cuBLASLt's tanh GELU epilogue (default:
    with ``fused``, unless the setting ``EMBEDFLEET_APPROXIMATE_GELU`` is off).
    ``dense_groups``: dense (cuDNN) attention over runs of equal-length inputs (default: CUDA),
    for a run shape seen before (``_groups``).
    ``graphs``: dense-only packed launches replayed from CUDA graphs (``varlen.GraphedEncoder``;
    default: on CUDA for BERT-path encoders up to ``GRAPH_MAX_WIDTH``; ``EMBEDFLEET_CUDA_GRAPHS=false``: never).
    ``streams``: eager packed launches take turns on this many CUDA streams (default 1: the current
    stream), so the batches the engine keeps in flight may overlap on the device (see ``_launch_stream``).
    """

    name = "torch"

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto", *,
                 varlen: bool | None = None, fused: bool | None = None, approximate_gelu: bool | None = None,
                 dense_groups: bool | None = None, graphs: bool | None = None, streams: int | None = None) -> None:
        self.info = info
        self.device = pick_device(device)
        self.torch_dtype = pick_dtype(dtype, self.device)
        self.dtype = dtype_name(self.torch_dtype)
        self.cuda = self.device.startswith("cuda")
        self.encoder: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        self.unpadded = False
        log.info("loading %s (%s, %s) on %s in %s", info.name, info.architecture, info.family, self.device, self.dtype)
        # Loaded on the host first: the unpadded encoder rearranges weights (fused QKV) there,
        # so the GPU never holds two copies. Faithfully or refused (worker.models.loading); the
        # native families (JinaBERT, decoder rerankers) come back as modules of the same shape.
        model = load_model(info, self.torch_dtype)
        # bge-m3's sparse and ColBERT heads, on the host until they go to the device with the encoder
        heads = bge_m3.load_heads(info.path, info.hidden_size, self.torch_dtype) if info.kind == JobKind.embed else None
        want_varlen = self.cuda if varlen is None else varlen
        #: image-text models: both towers of transformers' CLIPModel / SiglipModel (padded texts)
        self.image_text = "image" in info.modalities
        self._siglip_pad = vision.pad_token_id(info.path) if info.family == "siglip" else None
        if want_varlen and self.image_text:
            if varlen:
                raise BadInput(f"varlen=True but {info.name} cannot run unpadded: it is an image-text model")
            want_varlen = False
        if want_varlen and info.splade is not None:
            if varlen:
                raise BadInput(f"varlen=True but {info.name} cannot run unpadded: SPLADE pools masked-LM logits")
            want_varlen = False
        if want_varlen and info.kind == JobKind.embed:
            from worker.backends import decoder, varlen as encoder

            unpadded = decoder if info.model_type in decoder.MODEL_TYPES else encoder
            reason = unpadded.unsupported_reason(model)
            if reason and varlen:
                raise BadInput(f"varlen=True but {info.name} cannot run unpadded: {reason}")
            if reason:
                log.info("%s runs padded: %s", info.name, reason)
            else:
                built = decoder.build_decoder(model) if unpadded is decoder else encoder.build_encoder(model)
                self.encoder = _to_arena(built, heads, self.device)
                self.unpadded = True
                del model
        if self.encoder is None:
            self.model = model.to(self.device)
            if self.device == "cpu":
                from worker.backends.torch_cpu import optimize

                self.model = optimize(self.model, self.torch_dtype)
            params = inspect.signature(self.model.forward).parameters
            self._takes_type_ids = "token_type_ids" in params
        self.fused = bool((self.cuda if fused is None else fused) and self.encoder is not None)
        # On by default with the fused kernels: measured on the bundled model, min cosine to fp32
        # 0.999735 with it and 0.999736 without (bf16 rounding dominates), for ~8% more speed.
        approx = settings().approximate_gelu if approximate_gelu is None else approximate_gelu
        self.approximate_gelu = bool(approx and self.fused and not isinstance(self.encoder, DecoderEncoder))
        if self.encoder is not None:
            self.encoder.set_fusion(self.fused, self.approximate_gelu)  # type: ignore[operator]
            if not isinstance(self.encoder, DecoderEncoder):  # equal-length dense runs: the BERT path's
                self.encoder.dense_groups = bool(self.cuda if dense_groups is None else dense_groups)
        self.heads = heads.to(self.device) if heads is not None else None  # already there when unpadded
        self._dense_shapes: set[tuple[int, int]] = set()  # equal-length run shapes seen (``_groups``)
        self.graphs = self._graphed(graphs)
        self._streams = self._launch_streams(streams)
        self._turn = 0
        # No side stream for the input copy: creating one makes torch create its stream pool, which
        # held ~69 MiB of device memory outside the allocator on the H200 (bench/RESULTS-outputs.md),
        # more than the bar over transformers allows; the copy it overlapped is < 1 MB per batch.
        self.asynchronous = self.cuda
        #: the post-processing thread sleeps in its wait for a batch instead of spinning (``_fetch``)
        self.blocking_wait = self.cuda and settings().cuda_wait == "block"
        # On CPU small batches win (cache-resident activations): measured best at 1-4k tokens.
        # On a GPU this is only the fallback: the engine sizes the budget to the device's memory.
        self.preferred_batch_tokens = 16384 if self.cuda else 2048

    def _graphed(self, wanted: bool | None) -> GraphedEncoder | None:
        """The CUDA-graph runner of the BERT-path encoder, where it applies.

        By default only up to ``GRAPH_MAX_WIDTH`` (layers x hidden size): there the eager launch is
        as long as the batch on the device (MiniLM, H200: ~3 ms of host time a launch, 5.5 ms on the
        device for 65k tokens), while a large model's batch runs ~15x longer for ~4x the launch. And
        a graph's stream makes torch create its stream pool (~69 MiB outside the allocator, see
        ``asynchronous`` below), which the bge-m3 memory bar has no room for.
        """
        encoder = self.encoder
        if wanted is False or (wanted is None and settings().cuda_graphs is False):
            return None
        reason = None if self.cuda else "not on CUDA"
        if reason is None and (encoder is None or isinstance(encoder, DecoderEncoder)):
            reason = "only the unpadded BERT path is graphed"
        if reason is None and not flash_available(torch.device(self.device), self.torch_dtype):
            reason = f"no varlen flash attention for {self.dtype} here"
        if reason is None and wanted is None:
            width = len(encoder.layers) * int(encoder.config.hidden_size)  # type: ignore[union-attr]
            if width > GRAPH_MAX_WIDTH:
                reason = f"{width} (layers x hidden) is over {GRAPH_MAX_WIDTH}"
        if reason is not None:
            if wanted:
                raise BadInput(f"graphs=True but {self.info.name} cannot run in CUDA graphs: {reason}")
            return None
        return GraphedEncoder(encoder, pool_varlen, self.info.pooling, self.device)  # type: ignore[arg-type]

    def _launch_streams(self, wanted: int | None) -> list[Any]:
        """The side streams eager packed launches take turns on (none: the current stream).

        Why several: a batch's memory-bound passes (LayerNorm, attention's tails) and each GEMM's
        last partial wave leave the multiprocessors part idle; a second batch on another stream can
        fill them. Each stream's memory is its own to the caching allocator, and each batch's
        inputs, kernels, pooling and copy back stay on its one stream, so no extra ordering is
        needed. Not by default (creating streams makes torch create its stream pool: ~69 MiB of
        device memory outside the allocator, see ``asynchronous``); bench/gpu.py measures it.
        """
        count = 1 if wanted is None else int(wanted)
        if count < 1:
            raise BadInput(f"streams={wanted} must be at least 1", param="streams")
        if count == 1:
            return []
        if not self.cuda or self.encoder is None:
            raise BadInput(f"streams={wanted} needs the unpadded encoder on CUDA", param="streams")
        return [torch.cuda.Stream(self.device) for _ in range(count)]

    def _launch_stream(self) -> Any:
        """The stream context of the next eager packed launch (the current stream when there are no
        side streams). The chosen stream first waits for the current one, so the work queued there
        before (weights moved, a previous graph's staging) is done before it starts."""
        if not self._streams:
            return nullcontext()
        stream = self._streams[self._turn % len(self._streams)]
        self._turn += 1
        stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(stream)

    # ------------------------------------------------------------------ memory
    @property
    def mode(self) -> str:  # type: ignore[override]
        mode = "varlen" if self.unpadded else "padded"
        if isinstance(self.encoder, DecoderEncoder):
            mode += "-decoder"
        if self.heads is not None:  # profiled with the heads running (worker.engine.memory.heaviest_forward)
            mode += "-heads"
        if self.fused:
            mode += "-fused" + ("-tanh" if self.approximate_gelu else "")
        if self.graphs is not None:
            mode += "-graphs"
        if self._streams:  # batches may overlap on the device: a profile of one is not the peak
            mode += f"-streams{len(self._streams)}"
        return mode

    def memory_device(self) -> MemoryDevice | None:
        return CudaMemory(self.device) if self.cuda else None

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

    def host_buffer(self, size: int) -> Any:
        """Pinned memory on CUDA (from torch's caching host allocator: reused, not re-pinned)."""
        return torch.empty(size, dtype=torch.int32, pin_memory=self.cuda)

    def _packed_host(self, batch: Batch) -> torch.Tensor:
        """One int32 host buffer: ids, type ids, positions, cu_seqlens (a single copy to the device)."""
        if isinstance(batch.host, torch.Tensor):  # the engine packed it into our buffer already
            return batch.host
        total = int(batch.input_ids.shape[0])
        cu = batch.cu_seqlens
        positions = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], batch.lengths)
        host = torch.from_numpy(np.concatenate([batch.input_ids, batch.token_type_ids, positions, cu]).astype(np.int32))
        return host.pin_memory() if self.cuda else host

    def _split_packed(self, flat: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, ...]:
        total = int(batch.input_ids.shape[0])
        ids, types, positions = flat[:total], flat[total:2 * total], flat[2 * total:3 * total]
        return ids, types, positions, flat[3 * total:]

    def _packed_inputs(self, batch: Batch, host: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The packed batch on the device: one asynchronous copy from pinned memory, queued on the
        compute stream ahead of the batch's kernels (so the device thread does not wait for it)."""
        flat = (self._packed_host(batch) if host is None else host).to(self.device, non_blocking=self.cuda)
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
            raise TypeError("this backend runs unpadded: give it packed batches (Batch.pack)")
        inputs = self._padded_inputs(batch)
        with self._widen(precise):
            if self.image_text:
                result = self._text_features(inputs)
            elif self.info.splade is not None:  # the [n, vocab] weights (what the memory profile measures)
                result = splade.pool(self.model(**inputs).logits, inputs["attention_mask"], self.info.splade)
            elif self.info.kind == JobKind.embed:
                hidden = self.model(**inputs).last_hidden_state
                result = pool(hidden, inputs["attention_mask"], self.info.pooling)
            else:
                result = self.model(**inputs).logits
        return self._fetch(result)

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The text tower's projected features; SigLIP's texts padded to its maximum length, unmasked,
        as its processor's ``padding="max_length"`` gives them (how it was trained)."""
        assert self.model is not None
        if self._siglip_pad is None:
            return vision.features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                                attention_mask=inputs["attention_mask"]))
        ids = inputs["input_ids"]
        full = torch.full((ids.shape[0], self.info.max_length), self._siglip_pad, dtype=ids.dtype, device=ids.device)
        full[:, :ids.shape[1]] = torch.where(inputs["attention_mask"].bool(), ids, self._siglip_pad)
        return vision.features(self.model.get_text_features(input_ids=full))

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """The image tower's projected features of ``[n, 3, H, W]`` pixel values."""
        if not self.image_text or self.model is None:
            return super().image_features(pixels)
        host = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if self.cuda:
            host = host.pin_memory()
        values = host.to(self.device, non_blocking=self.cuda).to(self.torch_dtype)
        return self._fetch(vision.features(self.model.get_image_features(pixel_values=values)))

    def _fetch(self, result: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start the copy of ``result`` to (pinned) host memory; the returned function waits for it.

        The wait is on an event recorded after the copy. CUDA's default event synchronization
        spins, so the post-processing thread burns a core for as long as the batch runs (no GIL
        held, but a core the engine's other threads and the tokenizer processes share);
        ``EMBEDFLEET_CUDA_WAIT=block`` records a blocking-sync event, whose wait sleeps until the
        device signals it (``wait_cpu_ms`` shows the difference)."""
        result = result.float()
        if not self.cuda:
            host = result.numpy()
            return lambda: host
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
        event = torch.cuda.Event(blocking=self.blocking_wait)
        event.record()

        def wait() -> np.ndarray:
            event.synchronize()
            return host.numpy()

        return wait

    def _groups(self, lengths: np.ndarray) -> list[tuple[int, int, int]] | None:
        """The equal-length runs for dense attention, if every run's shape was seen before.

        Why not at once: cuDNN builds an execution plan per shape, which took 80-157 ms of host
        time per new shape on the H200 (bench/launch_diag.py, MiniLM) against ~3 ms for a launch
        whose plans exist. Length-sorted bulk batches rarely repeat a shape, so a shape's first
        batch runs varlen flash and only a repeated one (the seed workload's) pays for its plan;
        at most ``DENSE_SHAPES`` shapes are remembered, so the plans built stay bounded.
        """
        if not self.encoder.dense_groups:  # type: ignore[union-attr]
            return None
        groups = equal_length_groups(lengths)
        if groups is None:
            return None
        shapes = {(count, length) for _, count, length in groups}
        if shapes <= self._dense_shapes:
            return groups
        if len(self._dense_shapes) + len(shapes) <= DENSE_SHAPES:
            self._dense_shapes |= shapes
        return None

    def _launch_packed(self, batch: Batch, precise: bool) -> Callable[[], np.ndarray]:
        if self.encoder is None:
            raise TypeError("this backend runs padded: give it padded batches")
        host = None
        if self.graphs is not None and not precise:
            host = self._packed_host(batch)  # packed once: an eager fallback copies the same buffer
            pooled = self.graphs.launch(host, batch.lengths)
            if pooled is not None:
                return self._fetch(pooled)
        max_len = int(batch.lengths.max())
        groups = self._groups(batch.lengths)
        with self._launch_stream(), self._widen(precise):
            ids, types, positions, cu = self._packed_inputs(batch, host)
            hidden = self.encoder(ids, types, positions, cu, max_len, groups)
            return self._fetch(pool_varlen(hidden, cu, self.info.pooling))

    # ------------------------------------------------------------------ sparse and multi-vector outputs
    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.info.splade is not None:
            return ("sparse",)
        return DENSE_ONLY + (self.heads.outputs if self.heads is not None else ())

    @torch.inference_mode()
    def launch_outputs(self, batch: Batch, outputs: tuple[str, ...],
                       precise: bool = False) -> Callable[[], BatchOutputs]:
        """Dense, sparse and multi-vector outputs of one forward pass; each head runs only if asked.

        Token states are taken in the packed layout (``[total, hidden]``, input after input) on
        both paths, so the heads see only real tokens; the host finishes each input's rows
        (``bge_m3.M3Heads.lexical_weights``) in the returned function, off the device thread.
        """
        missing = [name for name in outputs if name not in self.outputs]
        if missing:
            raise BadInput(f"{self.info.name} does not give {', '.join(missing)} outputs (it gives "
                           f"{', '.join(self.outputs)})", param="outputs")
        if self.info.splade is not None:
            wait = self.launch(batch, precise)
            return lambda: BatchOutputs(sparse=splade.sparse_rows(wait()))
        with self._widen(precise):
            tokens, dense = self._token_rows(batch)
            cu = batch.cu_seqlens
            fetched: dict[str, torch.Tensor] = {}
            if "dense" in outputs:
                fetched["dense"] = dense
            if "sparse" in outputs and self.heads is not None:
                fetched["sparse"] = self.heads.token_weights(tokens)
            if "multivector" in outputs and self.heads is not None:
                rest = np.ones(int(cu[-1]), dtype=bool)
                rest[cu[:-1]] = False  # every token but each input's first
                # rows by index, found on the host: a boolean mask on the device makes the launch
                # wait for the device to count its rows (as mean pooling's sync did, issue 13)
                keep = torch.from_numpy(np.flatnonzero(rest))
                keep = (keep.pin_memory() if self.cuda else keep).to(tokens.device, non_blocking=self.cuda)
                fetched["multivector"] = self.heads.colbert_vectors(tokens.index_select(0, keep))
            waits = {name: self._fetch(tensor) for name, tensor in fetched.items()}
        ids = batch.input_ids if batch.packed else batch.input_ids[batch.attention_mask.astype(bool)]
        return lambda: self._finish_outputs({name: wait() for name, wait in waits.items()}, ids, cu)

    def _token_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every real token's last hidden state ``[total, hidden]`` (input after input), and the pooled vectors."""
        if batch.packed:
            if self.encoder is None:
                raise TypeError("this backend runs padded: give it padded batches")
            ids, types, positions, cu = self._packed_inputs(batch)
            groups = self._groups(batch.lengths)
            hidden = self.encoder(ids, types, positions, cu, int(batch.lengths.max()), groups)
            return hidden, pool_varlen(hidden, cu, self.info.pooling)
        if self.model is None:
            raise TypeError("this backend runs unpadded: give it packed batches (Batch.pack)")
        inputs = self._padded_inputs(batch)
        hidden = self.model(**inputs).last_hidden_state
        return hidden[inputs["attention_mask"].bool()], pool(hidden, inputs["attention_mask"], self.info.pooling)

    def _finish_outputs(self, host: dict[str, np.ndarray], ids: np.ndarray, cu: np.ndarray) -> BatchOutputs:
        out = BatchOutputs(dense=host.get("dense"))
        n = len(cu) - 1
        if "sparse" in host and self.heads is not None:
            weights = host["sparse"]
            out.sparse = [self.heads.lexical_weights(ids[cu[i]:cu[i + 1]], weights[cu[i]:cu[i + 1]]) for i in range(n)]
        if "multivector" in host:
            vectors = host["multivector"]
            out.multivector = [vectors[cu[i] - i:cu[i + 1] - i - 1] for i in range(n)]
        return out

    @torch.inference_mode()
    def token_states(self, batch: Batch) -> list[np.ndarray]:
        """Token states of a padded batch through the transformers model (the unpadded CUDA
        encoder keeps no such model: there, token embeddings are refused with the reason)."""
        if self.model is None or self.info.kind != JobKind.embed or self.image_text or self.info.splade is not None:
            why = ("it runs the unpadded CUDA encoder" if self.model is None else
                   f"it is a {self.info.kind.value} model" if self.info.kind != JobKind.embed else
                   f"it is a {self.info.family} model, whose token states are not its embeddings")
            raise BadInput(f"token embeddings (/embed_all) are not offered for {self.info.name}: {why}", param="model")
        inputs = self._padded_inputs(batch)
        hidden = self.model(**inputs).last_hidden_state.float().cpu().numpy()
        return [np.ascontiguousarray(hidden[row, :n]) for row, n in enumerate(batch.lengths)]

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()

    def close(self) -> None:
        self.model = None
        self.encoder = None
        if self.cuda:
            torch.cuda.empty_cache()
