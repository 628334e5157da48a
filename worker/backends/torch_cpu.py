"""CPU-specific tuning of the torch backend (threads, oneDNN, bf16 on AVX-512-BF16/AMX).

Kept apart from ``torch.py`` so CPU work and GPU work evolve separately.
"""

from __future__ import annotations

import torch


def optimize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Return the model prepared for CPU inference in ``dtype`` (currently: as loaded)."""
    return model
