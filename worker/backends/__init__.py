"""One module per backend behind one small interface (``worker.backends.base.Backend``).

Backends are imported only when asked for, so a worker without onnxruntime or the Neuron SDK
still runs torch, and asking for a missing one says what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.backends.base import Backend
    from worker.models.resolve import ModelInfo

#: name -> (module, class, what to install when the import fails)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("worker.backends.torch", "TorchBackend", "pip install torch"),
    "onnx": ("worker.backends.onnx", "OnnxBackend", "pip install 'embedfleet[onnx]'"),
    "neuron": ("worker.backends.neuron", "NeuronBackend", "pip install 'embedfleet[neuron]' on an inf2 instance"),
}


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here (its package or hardware is missing)."""


def backend_class(name: str) -> type:
    """The class implementing backend ``name``; unknown or missing ones fail with what to do."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(f"backend {name!r} is not implemented in this version of embedfleet") from exc
        raise BackendUnavailable(f"backend {name!r} needs the package {exc.name!r}: {install}") from exc
    return getattr(module, class_name)


def load_backend(name: str, info: "ModelInfo", device: str, dtype: str, **options: object) -> "Backend":
    """Load ``info`` on ``device`` with the named backend (``options`` go to the torch backend).

    ``auto`` on CPU measures the candidate backends/dtypes on a short sample and keeps the
    fastest that passes the quality gate (``worker.backends.select``); ``dtype`` narrows the
    candidates. On GPUs ``auto`` is the torch backend (bf16 where supported): its CUDA path is
    the fastest measured there (bench/RESULTS.md).
    """
    if name == "auto":
        from worker.backends.torch import pick_device

        resolved = pick_device(device)
        if resolved == "cpu":
            from worker.backends.select import select_backend

            return select_backend(info, device=resolved, dtype=dtype)
        name, device = "torch", resolved
    if name != "torch":
        options = {}
    return backend_class(name)(info, device=device, dtype=dtype, **options)
