"""The OpenVINO backend: the model (pooling or logits included) converted once to OpenVINO IR and
compiled by OpenVINO's CPU plugin.

Why a third CPU backend: on x86 CPUs with AVX-512 and AMX the CPU plugin fuses the whole encoder
(attention, layer norms, GELU) and runs its matmuls on the best kernels the CPU has (AMX tiles
or AVX-512-BF16 for bf16, AVX-512 for fp32), with shape-specialised kernels cached per batch
shape. bench/cpu.py measured it ahead of torch and ONNX Runtime on the 2-core Xeon (AMX) the
project's CPU work ran on (bench/RESULTS.md); the auto selection measures it against the others
on each machine, under the same quality rule.

The IR is cached under ``<cache>/openvino/<revision>-ov<major.minor>-<attention>`` (the cache
root is ``EMBEDFLEET_CACHE``), keyed by the model's content fingerprint and the OpenVINO
release that converted it, built in a temporary folder and renamed into place (as the ONNX
export is), so concurrent workers never read half of one.

``dtype``: ``float32`` runs in fp32 (``INFERENCE_PRECISION_HINT=f32``: left alone, the CPU
plugin silently runs bf16 on CPUs with bf16 units, and the dtype asked for is the dtype used);
``bfloat16`` runs the plugin's bf16 precision (where the CPU has bf16 units: AVX-512-BF16 or
AMX; elsewhere refused rather than emulated). Anything else is refused by name. ``device``:
``cpu`` (or ``auto``).
"""

from __future__ import annotations

import inspect
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import BadInput
from producer.settings import cache_dir
from worker.backends.base import Backend, Batch, canonical_dtype, cpu_threads
from worker.backends.onnx import INPUT_NAMES, publish, with_head
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: The CPU plugin's precision for each dtype this backend runs.
PRECISION = {"float32": "f32", "bfloat16": "bf16"}
#: Attention as exported (part of the cache key): transformers' SDPA, which the converter fuses.
ATTENTION = "sdpa"


def normalize_dtype(dtype: str) -> str:
    """``--dtype`` to what this backend runs; bf16 only where the CPU has bf16 units."""
    from worker.backends.torch_cpu import bf16_native

    name = canonical_dtype(dtype, ("float32", "bfloat16"), backend="openvino")
    name = "float32" if name == "auto" else name
    if name == "bfloat16" and not bf16_native():
        raise BadInput("dtype 'bfloat16' on the openvino backend needs a CPU with bf16 units (AVX-512-BF16 or AMX); "
                       "this one has neither: use float32", param="dtype")
    return name


def ir_dir(info: ModelInfo) -> Path:
    """The cache folder of one conversion: model revision, OpenVINO release, attention."""
    if not info.revision:
        raise BadInput(f"model {info.name!r} has no revision fingerprint, so its conversion cannot be cached")
    release = ".".join(metadata.version("openvino").split(".")[:2])
    return cache_dir("openvino") / f"{info.revision}-ov{release}-{ATTENTION}"


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
    ov.save_model(converted, str(dest / "model.xml"), compress_to_fp16=False)
    (dest / "export.json").write_text(json.dumps({
        "model": info.name, "revision": info.revision, "openvino": ov.__version__, "attention": ATTENTION,
        "inputs": names, "kind": info.kind.value, "pooling": info.pooling,
    }))


def ensure_ir(info: ModelInfo) -> Path:
    """The cached IR folder for ``info`` (converted on first use); holds model.xml/.bin, export.json."""
    dest = ir_dir(info)
    if (dest / "model.xml").is_file():
        return dest
    return publish(lambda tmp: _convert(info, tmp), dest, marker="model.xml")


class OpenVinoBackend(Backend):
    """A converted model compiled by OpenVINO's CPU plugin in fp32 or bf16."""

    name = "openvino"
    unpadded = False
    preferred_batch_tokens = 2048  # activations stay in the caches, as on ONNX Runtime's CPU path

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto") -> None:
        import openvino as ov

        from worker.models.loading import transformers_only

        transformers_only(info, "openvino")  # the converter traces transformers' classes, not the native families
        if device not in ("auto", "cpu"):
            raise BadInput(f"device {device!r} is not one the openvino backend runs on (auto, cpu)", param="device")
        self.info = info
        self.device = "cpu"
        self.dtype = normalize_dtype(dtype)
        self.path = ensure_ir(info)
        self._core = ov.Core()
        self._model = self._core.read_model(str(self.path / "model.xml"))
        self._input_names = [port.get_any_name() for port in self._model.inputs]
        self._request = self._compile(self.dtype)
        self._precise: Any = None
        log.info("openvino backend: %s on the CPU (%s, %d threads), %s", info.name, self.dtype, cpu_threads(),
                 self.path)

    def _compile(self, dtype: str) -> Any:
        config = {"INFERENCE_PRECISION_HINT": PRECISION[dtype], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": cpu_threads(), "NUM_STREAMS": 1}
        return self._core.compile_model(self._model, "CPU", config).create_infer_request()

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        """Pooled vectors or logits, float32; ``precise`` on bf16 reruns the batch in fp32."""
        request = self._request
        if precise and self.dtype != "float32":
            if self._precise is None:
                self._precise = self._compile("float32")
            request = self._precise
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int64) for name in self._input_names}
        output = request.infer(feed)
        return np.array(output[request.model_outputs[0]], dtype=np.float32)

    def close(self) -> None:
        self._request = None
        self._precise = None
        self._model = None
