"""SPLADE: sparse vectors over the vocabulary from a masked-LM, as sentence-transformers' SparseEncoder
defines them.

A SPLADE folder is a ``*ForMaskedLM`` checkpoint whose ``modules.json`` ends in ``SpladePooling``
(``1_SpladePooling/config.json``: ``pooling_strategy`` max or sum, ``activation_function`` relu or
log1p_relu). The vector of an input is, over its real tokens ``t`` and every vocabulary id ``v``::

    w[v] = pool_t log(1 + relu(logits[t, v]))            (log1p_relu: log(1 + log(1 + relu(.))))

with ``pool`` the max (SPLADE v2 and later) or the sum (the original). Zero weights are dropped;
``Options.max_active_dims`` keeps the k largest (sentence-transformers' ``max_active_dims``). The
query/document variants of a SparseEncoder are its prompts (``encode_query`` uses the ``query``
prompt, ``encode_document`` the first of ``document``/``passage``/``corpus``), asked for here with
``prompt_name``. Folders this module does not implement (a ``Router`` of a query and a document
branch, ``SparseStaticEmbedding``, ``SparseAutoEncoder``) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from producer.errors import UnsupportedModel

FAMILY = "splade"
#: sentence-transformers modules a SPLADE folder may hold besides its pooling
_ENCODERS = ("Transformer", "MLMTransformer")


@dataclass(frozen=True)
class SpladeConfig:
    """``1_SpladePooling/config.json``: how token logits become one vector."""

    pooling: str = "max"
    activation: str = "relu"

    def describe(self) -> str:
        return f"splade ({self.pooling} of log1p({self.activation}))"


def _type_name(module: dict[str, Any]) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def detect(path: Path, modules: list[dict[str, Any]]) -> SpladeConfig | None:
    """The folder's SPLADE pooling, ``None`` for a folder without one; a sparse folder of another
    shape is refused with what it holds."""
    names = [_type_name(m) for m in modules]
    sparse_modules = {"SpladePooling", "SparseStaticEmbedding", "SparseAutoEncoder", "Router"} & set(names)
    if not sparse_modules:
        return None
    if names[:1] not in (["Transformer"], ["MLMTransformer"]) or names[1:] != ["SpladePooling"]:
        raise UnsupportedModel(f"model at {path}: a sparse encoder made of {' -> '.join(names)} is not supported "
                               "(supported: a masked-LM Transformer followed by SpladePooling)")
    folder = modules[1].get("path") or ""
    config_file = path / folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    pooling = str(config.get("pooling_strategy", "max"))
    activation = str(config.get("activation_function", "relu"))
    if pooling not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise UnsupportedModel(f"model at {path}: SpladePooling with pooling_strategy {pooling!r} and "
                               f"activation_function {activation!r} is not supported (max or sum; relu or log1p_relu)")
    return SpladeConfig(pooling, activation)


def pool(logits: torch.Tensor, mask: torch.Tensor, config: SpladeConfig) -> torch.Tensor:
    """``[B, T, V]`` token logits -> ``[B, V]`` float32 vocabulary weights over the real tokens."""
    weights = torch.log1p(torch.relu(logits.float()))
    if config.activation == "log1p_relu":
        weights = torch.log1p(weights)
    weights = weights * mask.unsqueeze(-1).to(weights.dtype)  # padding gives 0 (weights are >= 0)
    return weights.amax(dim=1) if config.pooling == "max" else weights.sum(dim=1)


def sparse_rows(vectors: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each ``[V]`` vector's non-zero weights: ``(indices int32 ascending, values float32)``."""
    rows = []
    for vector in vectors:
        indices = np.flatnonzero(vector).astype(np.int32)
        rows.append((indices, vector[indices].astype(np.float32)))
    return rows
