"""One module per backend behind one small interface (``worker.backends.base.Backend``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.backends.base import Backend
    from worker.models import ModelInfo

BACKENDS = ("torch",)


def load_backend(name: str, info: "ModelInfo", device: str, dtype: str) -> "Backend":
    """Load ``info`` on ``device`` with the named backend; unknown names fail with the choices."""
    if name in ("torch", "auto"):
        from worker.backends.torch import TorchBackend

        return TorchBackend(info, device=device, dtype=dtype)
    if name in ("onnx", "neuron"):
        raise NotImplementedError(
            f"backend {name!r} is not available yet in this version of embedfleet; use --backend torch"
        )
    raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
