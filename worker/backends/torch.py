"""The torch backend: transformers models with SDPA attention, on CPU, CUDA or MPS.

The dtype asked for is the dtype the weights are loaded in (no fp32 copy kept around), and
pooling runs on the device so only ``[batch, hidden]`` is copied back.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext

import numpy as np
import torch

from producer.jobs import JobKind
from worker.backends.base import Batch
from worker.heads import pool
from worker.models import ModelInfo

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


class TorchBackend:
    """A transformers model on one device, loaded in the dtype asked for."""

    name = "torch"
    unpadded = False

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        self.info = info
        self.device = pick_device(device)
        self.torch_dtype = pick_dtype(dtype, self.device)
        self.dtype = dtype_name(self.torch_dtype)
        loader = AutoModel if info.kind == JobKind.embed else AutoModelForSequenceClassification
        log.info("loading %s (%s) on %s in %s", info.name, info.architecture, self.device, self.dtype)
        model = loader.from_pretrained(str(info.path), dtype=self.torch_dtype, attn_implementation="sdpa")
        self.model = model.to(self.device).eval()
        if self.device == "cpu":
            from worker.backends.torch_cpu import optimize

            self.model = optimize(self.model, self.torch_dtype)
        params = inspect.signature(self.model.forward).parameters
        self._takes_type_ids = "token_type_ids" in params
        self.preferred_batch_tokens = 16384 if self.device.startswith("cuda") else 8192

    def _inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        pin = self.device.startswith("cuda")
        tensors = {
            "input_ids": torch.from_numpy(batch.input_ids),
            "attention_mask": torch.from_numpy(batch.attention_mask),
        }
        if self._takes_type_ids:
            tensors["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
        out = {}
        for key, value in tensors.items():
            value = value.long()
            if pin:
                value = value.pin_memory()
            out[key] = value.to(self.device, non_blocking=pin)
        return out

    @torch.inference_mode()
    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        inputs = self._inputs(batch)
        widen = precise and self.torch_dtype == torch.float16
        context = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16) if widen else nullcontext()
        with context:
            if self.info.kind == JobKind.embed:
                hidden = self.model(**inputs).last_hidden_state
                result = pool(hidden, inputs["attention_mask"], self.info.pooling)
            else:
                result = self.model(**inputs).logits
        return result.float().cpu().numpy()

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
