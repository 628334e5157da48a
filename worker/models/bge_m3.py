"""bge-m3's two extra heads (FlagEmbedding's M3 layout): sparse lexical weights and ColBERT vectors.

A bge-m3 folder is an XLM-R encoder with sentence-transformers files (CLS pooling, normalized:
the dense output, served like any embedding model) plus two ``torch.nn.Linear`` state dicts
beside the weights, saved by FlagEmbedding's ``save``: ``sparse_linear.pt`` (hidden -> 1) and
``colbert_linear.pt`` (hidden -> d). Their definitions, from FlagEmbedding's
``EncoderOnlyEmbedderM3Model`` and ``M3Embedder.encode``, over the encoder's last hidden states:

* sparse: ``relu(sparse_linear(h))`` per token; per input, the largest weight of each token id,
  ids of the tokenizer's cls, eos, pad and unk tokens dropped, and weights <= 0 dropped.
* multivector: ``colbert_linear(h)`` of every token but the first (the CLS), padding excluded (the
  closing eos token is kept), each vector L2-normalized.

All three come from one forward pass; a head runs only when its output is asked for. The heads'
files are read with ``weights_only`` (no code runs) and refused by name when their tensors do not
fit the encoder, so a folder is served faithfully or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from producer.errors import UnsupportedModel

SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"
#: the output each head file gives (``producer.outputs``)
HEAD_FILES = {"sparse": SPARSE_FILE, "multivector": COLBERT_FILE}
#: the tokenizer's special tokens whose weights FlagEmbedding drops from the sparse output
SKIPPED_TOKENS = ("cls_token", "eos_token", "pad_token", "unk_token")


def head_outputs(path: Path) -> tuple[str, ...]:
    """The extra outputs a folder's head files give (none for a plain embedding model)."""
    return tuple(output for output, name in HEAD_FILES.items() if (path / name).is_file())


def _state(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, or a broken file
        raise UnsupportedModel(f"model at {path}: {name} is not a plain tensor state dict ({exc})") from exc
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UnsupportedModel(f"model at {path}: {name} must hold a Linear layer's weight and bias, not {keys}")
    return state


def _linear(path: Path, name: str, hidden: int, out: int | None) -> torch.nn.Linear:
    state = _state(path, name)
    weight, bias = state["weight"], state["bias"]
    width = out if out is not None else weight.shape[0]
    if weight.dim() != 2 or tuple(weight.shape) != (width, hidden) or tuple(bias.shape) != (width,):
        raise UnsupportedModel(f"model at {path}: {name} has weight {tuple(weight.shape)} and bias "
                               f"{tuple(bias.shape)}; the encoder's hidden size {hidden} needs weight "
                               f"({width}, {hidden}) and bias ({width},)")
    layer = torch.nn.Linear(hidden, width)
    layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return layer


def multivector_dims(path: Path) -> int:
    """The width of the ColBERT vectors (``colbert_linear.pt``'s output size), 0 without it."""
    if not (path / COLBERT_FILE).is_file():
        return 0
    return int(_state(path, COLBERT_FILE)["weight"].shape[0])


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def skipped_ids(path: Path) -> np.ndarray:
    """Ids of the cls, eos, pad and unk tokens the tokenizer names (FlagEmbedding's unused tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    named: dict[str, Any] = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as transformers reads it
        if (path / file).is_file():
            named.update({k: v for k, v in json.loads((path / file).read_text()).items() if k in SKIPPED_TOKENS})
    ids = set()
    for key in SKIPPED_TOKENS:
        token = _special_token(named, key)
        token_id = tokenizer.token_to_id(token) if token is not None else None
        if token_id is not None:
            ids.add(int(token_id))
    return np.array(sorted(ids), dtype=np.int32)


class M3Heads(torch.nn.Module):
    """The sparse and ColBERT heads on the device, and the per-input finishing on the host."""

    def __init__(self, sparse: torch.nn.Linear | None, colbert: torch.nn.Linear | None,
                 skipped: np.ndarray) -> None:
        super().__init__()
        self.sparse = sparse
        self.colbert = colbert
        self.skipped = skipped

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name, head in (("sparse", self.sparse), ("multivector", self.colbert)) if head is not None)

    def token_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """``relu(sparse_linear(h))`` for each token state ``[total, hidden]`` -> ``[total]`` float32."""
        assert self.sparse is not None
        return torch.relu(self.sparse(tokens)).squeeze(-1).float()

    def colbert_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalized ``colbert_linear(h)`` of the given token states -> ``[m, d]`` float32."""
        assert self.colbert is not None
        return torch.nn.functional.normalize(self.colbert(tokens).float(), dim=-1)

    def lexical_weights(self, ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One input's sparse vector: the largest weight per token id, special ids and zeros dropped,
        sorted by id."""
        keep = (weights > 0) & ~np.isin(ids, self.skipped)
        ids, weights = ids[keep], weights[keep]
        unique, inverse = np.unique(ids, return_inverse=True)
        best = np.zeros(len(unique), dtype=np.float32)
        np.maximum.at(best, inverse, weights.astype(np.float32))
        return unique.astype(np.int32), best


def load_heads(path: Path, hidden: int, dtype: torch.dtype) -> M3Heads | None:
    """The folder's heads in ``dtype`` (``None`` for a folder without head files)."""
    if not head_outputs(path):
        return None
    sparse = _linear(path, SPARSE_FILE, hidden, 1) if (path / SPARSE_FILE).is_file() else None
    colbert = _linear(path, COLBERT_FILE, hidden, None) if (path / COLBERT_FILE).is_file() else None
    heads = M3Heads(sparse, colbert, skipped_ids(path) if sparse is not None else np.zeros(0, np.int32))
    return heads.to(dtype).eval()
