"""The ONNX Runtime backend: a model exported once (pooling included), fused, optionally int8.

Why a second backend: on CPUs without bf16 units ONNX Runtime's fused transformer kernels beat
eager torch in fp32, and its int8 GEMMs (VNNI/AMX where the CPU has them) are the other CPU
lever; the auto selection measures each against the quality rule.

The export is cached under ``<cache>/onnx/<revision>-opset<N>-<level>[-int8tok<B> | -int8]`` (the cache root is
``EMBEDFLEET_CACHE``, default ``~/.cache/embedfleet``), keyed by the model's content fingerprint, so it is done once per
model version and redone when the model changes. Each cache folder is written to a temporary
name and renamed into place, so concurrent workers never read half an export.

``dtype`` for this backend: ``float32`` (or ``fp32``, or ``auto``) runs the fused fp32 graph;
``int8`` runs the same graph with its MatMuls in int8 with per-token activation scales
(``worker.backends.onnx_int8``: weights per output channel in blocks of 32, activations per
token and block at run time), which keeps the quality rule where ONNX Runtime's
``quantize_dynamic`` (one activation scale per batch; recall@10 vs fp32 0.91-0.92 on MiniLM)
does not. That plain dynamic export is still built for the benchmark's contender
(``ensure_export(info, True, scheme="dynamic")``, folder suffix ``-int8``). Anything else is
refused with a clear error.
``device``: ``cpu``; ``cuda`` (CUDA execution provider); ``tensorrt`` (TensorRT, then CUDA);
``auto`` takes CUDA when this onnxruntime build has it, else the CPU.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import BadInput
from producer.jobs import JobKind
from producer.settings import cache_dir
from worker.backends import onnx_int8
from worker.backends.base import Backend, Batch, canonical_dtype, cpu_threads
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

OPSET = 17
#: Transformer-fusion level of onnxruntime.transformers.optimizer (part of the cache key).
FUSION_LEVEL = "fused1"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: Architectures the ORT transformer optimizer fuses with its BERT patterns.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "distilbert", "ernie", "nomic_bert"}
_ORT_FAILURES_OOM = ("failed to allocate memory", "bad_alloc", "out of memory", "cudaerrormemoryallocation")


def cache_root() -> Path:
    """Where exports live: ``<cache>/onnx``."""
    return cache_dir("onnx")


def normalize_dtype(dtype: str) -> str:
    """Map ``--dtype`` to what this backend runs (float32: the fused graph; int8: per-token
    int8); fp16/bf16 are refused rather than ignored (use the torch backend for them)."""
    name = canonical_dtype(dtype, ("float32", "int8"), backend="onnx")
    return "float32" if name == "auto" else name


def providers_for(device: str) -> tuple[str, list[Any]]:
    """The resolved device and the execution providers for it; absent ones are a clear error."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    kind = device.split(":")[0]
    device_id = int(device.split(":")[1]) if ":" in device else 0
    if kind == "cpu":
        return device, ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BadInput(f"device {device!r}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        return device, [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    if kind == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise BadInput(f"device {device!r}: this onnxruntime has no TensorRT provider (onnxruntime-gpu with TensorRT)")
        trt_cache = cache_root() / "tensorrt"
        trt_cache.mkdir(parents=True, exist_ok=True)
        trt = {"device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
        return device, [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": device_id}),
                        "CPUExecutionProvider"]
    raise BadInput(f"device {device!r} is not one the onnx backend runs on (auto, cpu, cuda, tensorrt)")


# ---------------------------------------------------------------------------------- export
#: int8 schemes -> export folder suffix: per-token (the backend's int8), and ORT's plain dynamic one.
SCHEMES = {"token": f"-int8tok{onnx_int8.BLOCK}", "dynamic": "-int8"}


def export_dir(info: ModelInfo, quantized: bool, scheme: str = "token") -> Path:
    """The cache folder of one export: model revision, opset, fusion level, int8 scheme."""
    if not info.revision:
        raise BadInput(f"model {info.name!r} has no revision fingerprint, so its export cannot be cached")
    if scheme not in SCHEMES:
        raise BadInput(f"int8 scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    suffix = SCHEMES[scheme] if quantized else ""
    return cache_root() / f"{info.revision}-opset{OPSET}-{FUSION_LEVEL}{suffix}"


def publish(build: Any, dest: Path, marker: str = "model.onnx") -> Path:
    """Run ``build(tmpdir)`` and rename the folder into ``dest`` (first writer wins; ``marker``
    is the file a complete folder holds). The OpenVINO backend publishes its IR the same way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another worker published it first: theirs is identical
            if not (dest / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def with_head(model: Any, info: ModelInfo, takes_type_ids: bool) -> Any:
    """The module exported: the model plus its pooling (embed) or its logits (rerank, classify)."""
    import torch

    from worker.models.heads import pool

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if takes_type_ids:
                kwargs["token_type_ids"] = token_type_ids
            out = self.model(**kwargs)
            if info.kind == JobKind.embed:
                return pool(out.last_hidden_state, attention_mask, info.pooling)
            return out.logits

    return Exported().eval()


def _export_fp32(info: ModelInfo, dest: Path) -> None:
    """Export the fp32 model with pooling to ``dest/model.onnx`` and fuse it in place."""
    import torch

    from worker.models.loading import load_model

    # Eager attention exports to the MatMul/Softmax pattern ORT's optimizer fuses into Attention.
    # Faithfully or refused, as every backend loads (worker.models.loading).
    model = load_model(info, torch.float32, attention="eager")
    takes_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters
    names = list(INPUT_NAMES if takes_type_ids else INPUT_NAMES[:2])
    sample = torch.ones(2, 8, dtype=torch.long)
    args = (sample, sample, torch.zeros_like(sample))[: len(names)]
    raw = dest / "raw.onnx"
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["output"] = {0: "batch"}
    log.info("exporting %s to ONNX (opset %d)", info.name, OPSET)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(with_head(model, info, takes_type_ids), args, str(raw), input_names=names,
                          output_names=["output"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    _fuse(raw, dest / "model.onnx", info, model.config)
    raw.unlink()
    (dest / "export.json").write_text(json.dumps({
        "model": info.name, "revision": info.revision, "opset": OPSET, "fusion": FUSION_LEVEL,
        "inputs": names, "kind": info.kind.value, "pooling": info.pooling,
    }))


def _fuse(raw: Path, out: Path, info: ModelInfo, config: Any) -> None:
    """Transformer fusions (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm) where they apply."""
    from onnxruntime.transformers import optimizer

    model_type = "bert" if info.model_type in _BERT_LIKE else info.model_type
    try:
        fused = optimizer.optimize_model(
            str(raw), model_type=model_type, num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(config, "hidden_size", 0) or 0), opt_level=1, use_gpu=False,
        )
    except Exception as exc:  # an architecture the optimizer does not know still runs unfused
        log.warning("transformer fusions do not apply to %s (%s); using the plain export", info.model_type, exc)
        shutil.copy(raw, out)
        return
    log.info("ONNX fusions for %s: %s", info.name,
             {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    fused.save_model_to_file(str(out), use_external_data_format=raw.stat().st_size > (1800 << 20))


def _quantize_token(src: Path, dest: Path) -> None:
    """int8 MatMuls with per-token activation scales (``worker.backends.onnx_int8``)."""
    replaced = onnx_int8.quantize_model(src / "model.onnx", dest / "model.onnx")
    export = json.loads((src / "export.json").read_text())
    (dest / "export.json").write_text(json.dumps({
        **export, "quantization": f"int8 per token: {replaced} MatMulNBits, 8 bits, blocks of {onnx_int8.BLOCK}, "
                                  f"accuracy level {onnx_int8.ACCURACY_LEVEL}"}))


def _quantize_dynamic(src: Path, dest: Path) -> None:
    """ONNX Runtime's dynamic int8 (weights per output channel, one activation scale per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src / "model.onnx"), str(dest / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    export = json.loads((src / "export.json").read_text())
    (dest / "export.json").write_text(json.dumps({**export, "quantization": "dynamic int8, per channel"}))


def ensure_export(info: ModelInfo, quantized: bool = False, scheme: str = "token") -> Path:
    """The cached export folder for ``info`` (built on first use); holds model.onnx, export.json.
    ``quantized``: int8 of ``scheme`` (``token``: the backend's; ``dynamic``: ORT's plain one)."""
    dest = export_dir(info, quantized, scheme)
    if (dest / "model.onnx").is_file():
        return dest
    if quantized:
        fp32 = ensure_export(info, quantized=False)
        quantize = _quantize_token if scheme == "token" else _quantize_dynamic
        return publish(lambda tmp: quantize(fp32, tmp), dest)
    return publish(lambda tmp: _export_fp32(info, tmp), dest)


# ---------------------------------------------------------------------------------- backend
class OnnxBackend(Backend):
    """An exported, fused (optionally int8) model in an ONNX Runtime session."""

    name = "onnx"
    unpadded = False

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto") -> None:
        import onnxruntime  # noqa: F401  (fail early, with the registry's install hint)

        from worker.models.loading import transformers_only

        transformers_only(info, "onnx")  # the export knows transformers' classes, not the native families
        self.info = info
        self.dtype = normalize_dtype(dtype)
        self.device, self._providers = providers_for(device)
        if self.dtype == "int8" and not self.device.startswith("cpu"):
            raise BadInput("dtype 'int8' runs on the CPU only; use --device cpu")
        self.path = ensure_export(info, quantized=self.dtype == "int8")
        self._session = self._open(self.path)
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._precise: Any = None
        # Small batches keep activations in the CPU caches; a GPU wants big ones.
        self.preferred_batch_tokens = 2048 if self.device.startswith("cpu") else 16384
        log.info("onnx backend: %s on %s (%s), %s", info.name, self.device, self.dtype, self.path)

    def _open(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path / "model.onnx"), options, providers=self._providers)

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        """Pooled vectors or logits, float32; ``precise`` on int8 reruns the fp32 graph."""
        session = self._session
        if precise and self.dtype == "int8":
            if self._precise is None:
                self._precise = self._open(ensure_export(self.info, quantized=False))
            session = self._precise
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int64) for name in self._input_names}
        (output,) = session.run(["output"], feed)
        return np.asarray(output, dtype=np.float32)

    def is_out_of_memory(self, error: BaseException) -> bool:
        text = str(error).lower()
        return isinstance(error, MemoryError) or any(marker in text for marker in _ORT_FAILURES_OOM)

    def close(self) -> None:
        self._session = None
        self._precise = None
