"""The OpenVINO backend: the model (pooling or logits included) converted once to OpenVINO IR and
compiled by OpenVINO's CPU plugin.

Why a third CPU backend: on x86 CPUs with AVX-512 and AMX the CPU plugin fuses the whole encoder
(attention, layer norms, GELU) and runs its matmuls on the best kernels the CPU has (AMX tiles
or AVX-512-BF16 for bf16, AVX-512 for fp32), with shape-specialised kernels cached per batch
shape. bench/cpu.py measured it ahead of torch and ONNX Runtime on the 2-core Xeon (AMX) the
project's CPU work ran on (bench/RESULTS.md); the auto selection measures it against the others
on each machine, under the same quality rule.

The IR is cached under ``<cache>/openvino/<revision>-ov<major.minor>-<attention>-<edits>`` (the
cache root is ``EMBEDFLEET_CACHE``), keyed by the model's content fingerprint, the OpenVINO
release that converted it and the graph edits made after conversion (``openvino_graph.scheme``:
Q/K/V merged into one MatMul; a CLS-pooled model's last layer on its first token only), built
in a temporary folder and renamed into place (as the ONNX export is), so concurrent workers
never read half of one.

``dtype``: ``float32`` runs in fp32 (``INFERENCE_PRECISION_HINT=f32``: left alone, the CPU
plugin silently runs bf16 on CPUs with bf16 units, and the dtype asked for is the dtype used);
``bfloat16`` runs the plugin's bf16 precision (where the CPU has bf16 units: AVX-512-BF16 or
AMX; elsewhere refused rather than emulated); ``int8`` runs an IR whose MatMul weights are int8
per output channel with activations quantized per token at run time
(``worker.backends.openvino_int8``; the other ops in bf16 where the CPU has bf16 units, else
fp32), where the CPU has int8 dot products (VNNI or AMX; elsewhere refused: the plugin would
decompress the weights to fp32). Anything else is refused by name. ``device``: ``cpu`` (or
``auto``).

The int8 IR is cached beside the fp32 one, its folder name ending in the weight scheme
(``openvino_int8.weight_scheme()``: int8 per channel, the smoothing and its calibration, the recall
below which sensitive MatMul roles stay bf16), built from the fp32 IR; its export.json says which
roles were kept and the calibration recall of every mix tried.

``streams``: how many batches run at once. One stream runs one batch on every core
(``PERFORMANCE_HINT=LATENCY``); ``n`` streams (``THROUGHPUT``) run ``n`` batches side by side on
the cores split between them, each through its own infer request started asynchronously
(``launch``), so the engine forms and tokenizes the next batch while they compute, and the small
per-layer ops (layer norm, softmax, GELU) of a 384-wide encoder stop paying for cross-core
synchronisation. The default, ``EMBEDFLEET_OPENVINO_STREAMS`` = 0, is one stream per core up to
two (what was measured, on the 2-core Xeon: bench/RESULTS.md; more streams on larger machines are
not measured, so not the default); it is part of the backend's ``mode`` and of the auto
selection's cache key.
"""

from __future__ import annotations

import inspect
import json
import logging
import queue
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from producer.errors import BadInput
from producer.jobs import JobKind
from producer.settings import cache_dir, settings
from worker.backends import openvino_graph, openvino_int8
from worker.backends.base import Backend, Batch, canonical_dtype, cpu_threads, sorted_batches
from worker.backends.onnx import INPUT_NAMES, publish, with_head
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: The CPU plugin's precision for each dtype this backend runs (int8: see ``_precision``).
PRECISION = {"float32": "f32", "bfloat16": "bf16"}
#: Attention as exported (part of the cache key): transformers' SDPA, which the converter fuses.
ATTENTION = "sdpa"


def normalize_dtype(dtype: str) -> str:
    """``--dtype`` to what this backend runs; bf16 only where the CPU has bf16 units, int8 only
    where it has int8 dot products."""
    from worker.backends.openvino_int8 import int8_native
    from worker.backends.torch_cpu import bf16_native

    name = canonical_dtype(dtype, ("float32", "bfloat16", "int8"), backend="openvino")
    name = "float32" if name == "auto" else name
    if name == "bfloat16" and not bf16_native():
        raise BadInput("dtype 'bfloat16' on the openvino backend needs a CPU with bf16 units (AVX-512-BF16 or AMX); "
                       "this one has neither: use float32", param="dtype")
    if name == "int8" and not int8_native():
        raise BadInput("dtype 'int8' on the openvino backend needs a CPU with int8 dot products (AVX-512-VNNI, "
                       "AVX-VNNI or AMX); without them OpenVINO decompresses int8 weights to fp32: use float32, "
                       "or --backend onnx --dtype int8", param="dtype")
    return name


def _precision(dtype: str) -> str:
    """The plugin's precision hint: int8 runs its non-int8 ops in bf16 where the CPU has bf16 units."""
    from worker.backends.torch_cpu import bf16_native

    if dtype == "int8":
        return "bf16" if bf16_native() else "f32"
    return PRECISION[dtype]


def stream_count(streams: int | None = None) -> int:
    """Streams to run: ``streams`` if given, else the setting; 0 means one per core, at most two."""
    wanted = settings().openvino_streams if streams is None else streams
    if wanted < 0:
        raise BadInput(f"openvino streams must be 0 (one per core, at most two) or more, not {wanted}",
                       param="openvino_streams")
    return wanted or min(2, cpu_threads())


def ir_dir(info: ModelInfo, int8: bool = False) -> Path:
    """The cache folder of one conversion: model revision, OpenVINO release, attention, and the
    int8 weight scheme for the int8 IR."""
    if not info.revision:
        raise BadInput(f"model {info.name!r} has no revision fingerprint, so its conversion cannot be cached")
    release = ".".join(metadata.version("openvino").split(".")[:2])
    suffix = f"-{openvino_int8.weight_scheme()}" if int8 else ""
    return cache_dir("openvino") / f"{info.revision}-ov{release}-{ATTENTION}-{openvino_graph.scheme(info)}{suffix}"


def _convert(info: ModelInfo, dest: Path) -> None:
    """Convert the fp32 model with its head to ``dest/model.xml`` (weights kept in fp32)."""
    import openvino as ov
    import torch

    from worker.models.loading import load_model

    model = load_model(info, torch.float32, attention=ATTENTION)  # faithfully, or refused
    takes_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters
    names = list(INPUT_NAMES if takes_type_ids else INPUT_NAMES[:2])
    sample = torch.ones(2, 8, dtype=torch.long)
    example = dict(zip(names, (sample, sample, torch.zeros_like(sample))))
    log.info("converting %s to OpenVINO IR (OpenVINO %s)", info.name, ov.__version__)
    with torch.inference_mode(False), torch.no_grad():
        converted = ov.convert_model(with_head(model, info, takes_type_ids), example_input=example,
                                     input=[(name, ov.PartialShape([-1, -1]), ov.Type.i64) for name in names])
    edits = openvino_graph.edit(converted, info)
    ov.save_model(converted, str(dest / "model.xml"), compress_to_fp16=False)
    (dest / "export.json").write_text(json.dumps({
        "model": info.name, "revision": info.revision, "openvino": ov.__version__, "attention": ATTENTION,
        "inputs": names, "kind": info.kind.value, "pooling": info.pooling, "edits": edits,
    }))


def _calibration(info: ModelInfo, names: list[str], budget: int = 2048) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Feeds (and their attention masks) of the int8 IR's calibration paragraphs: CPython's
    documentation after the paragraphs the auto selection's quality rule measures on, in
    length-sorted padded batches of at most ``budget`` tokens (``base.sorted_batches``)."""
    from worker.backends.quality import QUALITY_TEXTS, prose

    texts = prose(QUALITY_TEXTS + openvino_int8.CALIBRATION_TEXTS)[QUALITY_TEXTS:]
    _, batches, _ = sorted_batches(info, texts, budget)
    feeds = [{name: np.ascontiguousarray(getattr(batch, name), dtype=np.int64) for name in names} for batch in batches]
    return feeds, [batch.attention_mask for batch in batches]


def _quantize(info: ModelInfo, src: Path, dest: Path) -> None:
    """The fp32 IR in ``src``, smoothed on calibration prose, with its MatMul weights int8 per
    channel except the roles that lose the calibration recall (kept in bf16), to ``dest``
    (``openvino_int8``)."""
    import openvino as ov

    from worker.backends.quality import agreement

    core = ov.Core()
    model = core.read_model(str(src / "model.xml"))
    names = [port.get_any_name() for port in model.inputs]
    feeds, masks = _calibration(info, names)
    ranges, reference = openvino_int8.calibrate(model, feeds, masks)
    config = {"INFERENCE_PRECISION_HINT": _precision("int8"), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": cpu_threads(), "DYNAMIC_QUANTIZATION_GROUP_SIZE": openvino_int8.ACTIVATION_GROUP}

    def built(kept: frozenset[str]) -> tuple[Any, int]:
        candidate = core.read_model(str(src / "model.xml"))
        return candidate, openvino_int8.rewrite_weights(candidate, ranges, kept)

    def recall(kept: frozenset[str]) -> float:
        return agreement(reference, openvino_int8.outputs(built(kept)[0], feeds, config)).recall

    if info.kind == JobKind.embed:
        kept, tried = openvino_int8.sensitive_roles(recall, openvino_int8.roles(model))
    else:  # scores have no neighbours to recall: the auto selection's score gate judges the all-int8 IR
        kept, tried = frozenset(), []
    model, replaced = built(kept)
    ov.save_model(model, str(dest / "model.xml"), compress_to_fp16=False)
    export = json.loads((src / "export.json").read_text())
    (dest / "export.json").write_text(json.dumps({
        **export, "quantization": f"int8 weights per output channel ({replaced} MatMuls), smoothed (alpha "
                                  f"{openvino_int8.SMOOTHING_ALPHA}, {len(ranges)} input groups, {len(feeds)} calibration "
                                  f"batches), activations per token in groups of {openvino_int8.ACTIVATION_GROUP} "
                                  f"at run time",
        "kept_bf16": sorted(kept),
        "calibration_recall": [{"kept": sorted(k), "recall": round(r, 4)} for k, r in tried]}))
    log.info("int8 IR of %s: %d MatMuls int8, kept in bf16: %s (calibration recall@10 %s)", info.name, replaced,
             ", ".join(sorted(kept)) or "none", ", ".join(f"{r:.4f}" for _, r in tried))


def ensure_ir(info: ModelInfo, int8: bool = False) -> Path:
    """The cached IR folder for ``info`` (converted on first use; ``int8``: the int8-weight IR, made
    from the fp32 one); holds model.xml/.bin, export.json."""
    dest = ir_dir(info, int8)
    if (dest / "model.xml").is_file():
        return dest
    if int8:
        fp32 = ensure_ir(info)
        return publish(lambda tmp: _quantize(info, fp32, tmp), dest, marker="model.xml")
    return publish(lambda tmp: _convert(info, tmp), dest, marker="model.xml")


class OpenVinoBackend(Backend):
    """A converted model compiled by OpenVINO's CPU plugin in fp32, bf16 or int8."""

    name = "openvino"
    unpadded = False
    preferred_batch_tokens = 2048  # activations stay in the caches, as on ONNX Runtime's CPU path

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto", streams: int | None = None) -> None:
        import openvino as ov

        from worker.models.loading import transformers_only

        transformers_only(info, "openvino")  # the converter traces transformers' classes, not the native families
        if device not in ("auto", "cpu"):
            raise BadInput(f"device {device!r} is not one the openvino backend runs on (auto, cpu)", param="device")
        self.info = info
        self.device = "cpu"
        self.dtype = normalize_dtype(dtype)
        self.streams = stream_count(streams)
        self.asynchronous = self.streams > 1  # the engine keeps a batch per stream in flight
        self.mode = f"streams{self.streams}"
        # The same tokens per core as one stream's 2048 on two cores: each stream runs on its share.
        self.preferred_batch_tokens = max(512, 2048 // self.streams)
        self.path = ensure_ir(info, int8=self.dtype == "int8")
        self._core = ov.Core()
        self._model = self._core.read_model(str(self.path / "model.xml"))
        self._input_names = [port.get_any_name() for port in self._model.inputs]
        self._free = self._compile(self.dtype, self.streams)
        self._precise: queue.Queue[Any] | None = None
        log.info("openvino backend: %s on the CPU (%s, %d threads, %d streams), %s", info.name, self.dtype,
                 cpu_threads(), self.streams, self.path)

    def _compile(self, dtype: str, streams: int) -> "queue.Queue[Any]":
        """The model compiled for ``dtype`` with ``streams`` streams: a queue of that many free infer requests."""
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _precision(dtype),
                                  "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
                                  "INFERENCE_NUM_THREADS": cpu_threads(), "NUM_STREAMS": streams}
        model = self._model
        if dtype == "int8":  # per-token activation scales; 0 would leave activations in fp32/bf16
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = openvino_int8.ACTIVATION_GROUP
        elif self.dtype == "int8":  # the precise path of an int8 backend: the fp32 IR
            model = self._core.read_model(str(ensure_ir(self.info) / "model.xml"))
        compiled = self._core.compile_model(model, "CPU", config)
        free: queue.Queue[Any] = queue.Queue()
        for _ in range(streams):
            free.put(compiled.create_infer_request())
        return free

    def launch(self, batch: Batch, precise: bool = False) -> Callable[[], np.ndarray]:
        """Start the batch on a free infer request (waiting for one); the function returned waits
        for its pooled vectors or logits (float32). ``precise`` on bf16 or int8 runs the batch in fp32."""
        free = self._free
        if precise and self.dtype != "float32":
            if self._precise is None:
                self._precise = self._compile("float32", 1)
            free = self._precise
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int64) for name in self._input_names}
        request = free.get()
        try:
            request.start_async(feed, share_inputs=True)  # ``feed`` lives until wait() returns
        except BaseException:
            free.put(request)
            raise

        def wait() -> np.ndarray:
            try:
                request.wait()
                return np.array(request.get_output_tensor(0).data, dtype=np.float32)
            finally:
                del feed_kept[:]
                free.put(request)

        feed_kept = [feed]
        return wait

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        """Pooled vectors or logits, float32; ``precise`` on bf16 or int8 reruns the batch in fp32."""
        return self.launch(batch, precise)()

    def close(self) -> None:
        self._free = queue.Queue()
        self._precise = None
        self._model = None
