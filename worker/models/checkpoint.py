"""A model folder's weight files: which tensors they hold (names and shapes) and the tensors themselves.

The native families (``worker.models.jina_bert``) load their weights by the names the published
checkpoints use, and the faithful-loading check (``worker.models.loading``) must know what a
folder holds without running transformers. Both read here: safetensors (one file, or sharded with
``model.safetensors.index.json``) through ``safetensors``' own reader, whose header gives names and
shapes without reading the data; PyTorch ``.bin`` files (one, or sharded with
``pytorch_model.bin.index.json``) through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from producer.errors import UnsupportedModel

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(path: Path) -> list[Path]:
    """The files holding the model's weights, safetensors first; none is an error naming the folder."""
    for index_name in (_SAFETENSORS_INDEX, _BIN_INDEX):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [name for name in shards if not (path / name).is_file()]
            if missing:
                raise UnsupportedModel(f"model at {path}: {index_name} names weight files that are absent: "
                                       f"{', '.join(missing)}")
            return [path / name for name in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise UnsupportedModel(f"model at {path}: no weights (model.safetensors or pytorch_model.bin)")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape; safetensors are read from their headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        else:
            shapes.update({name: tuple(t.shape) for name, t in _load_bin(file).items()})
    return shapes


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, on the CPU, in the dtype it was saved in."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors.update(load_file(str(file), device="cpu"))
        else:
            tensors.update(_load_bin(file))
    return tensors


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint, tensors only (``weights_only``: no code runs from the file)."""
    data = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{file}: not a state dict of tensors")
    return {str(name): tensor for name, tensor in data.items() if isinstance(tensor, torch.Tensor)}
