"""Image-text models (CLIP, SigLIP): images and texts embedded into one space.

A folder whose config's ``model_type`` is ``clip`` or ``siglip`` (transformers' ``CLIPModel``,
``SiglipModel``) is an embed model of two towers: texts go through ``get_text_features``, images
through ``get_image_features``, both as transformers defines them (projection included). Texts
take the usual engine path; SigLIP's text tower was trained on inputs padded to its maximum
length with no attention mask (its processor's ``padding="max_length"``), so its texts are run so.

Images arrive as references (``{"image": ...}`` inputs): a ``data:`` URI, an ``http(s)://`` URL,
or raw bytes (corpus columns). Each is checked before it is decoded: at most
``EMBEDFLEET_IMAGE_MAX_BYTES`` encoded and ``EMBEDFLEET_IMAGE_MAX_PIXELS`` pixels (the
decompression-bomb limit: PIL reads the size from the header without decoding). Preprocessing is
the folder's own processor config (``preprocessor_config.json``) through transformers' image
processor on its PIL path, on the engine's host threads; a broken, huge or non-image input fails
alone with the reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from producer.errors import UnsupportedModel
from producer.settings import settings

FAMILIES = {"clip": "clip", "siglip": "siglip"}


def detect(config: dict[str, Any]) -> str | None:
    """``clip`` or ``siglip`` for an image-text folder, else ``None``."""
    return FAMILIES.get(str(config.get("model_type", "")))


def embedding_dims(config: dict[str, Any], family: str) -> int:
    """The shared space's width: CLIP's ``projection_dim``; SigLIP's text tower's hidden size."""
    if family == "clip":
        return int(config.get("projection_dim") or 512)
    return int((config.get("text_config") or {}).get("hidden_size") or 768)


def text_max_length(config: dict[str, Any]) -> int | None:
    return (config.get("text_config") or {}).get("max_position_embeddings")


def pad_token_id(path: Path) -> int:
    """The tokenizer's pad token id (SigLIP pads every text to its maximum length with it)."""
    from tokenizers import Tokenizer

    named: dict[str, Any] = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / file).is_file():
            named.update(json.loads((path / file).read_text()))
    token = named.get("pad_token")
    token = token.get("content") if isinstance(token, dict) else token
    found = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(token) if isinstance(token, str) else None
    if found is None:
        raise UnsupportedModel(f"model at {path}: its tokenizer names no pad token, which SigLIP's texts need")
    return int(found)


def features(output: Any) -> torch.Tensor:
    """``get_*_features``' tensor (transformers 5 returns an output object with ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------- image inputs
class ImageProblem(ValueError):
    """An image input that cannot be used; the message is its reason (no position)."""


def _limits() -> tuple[int, int]:
    current = settings()
    return current.image_max_bytes, current.image_max_pixels


def image_bytes(ref: Any) -> bytes:
    """The encoded bytes of one image input: raw bytes, a ``data:`` URI, or an ``http(s)`` URL."""
    max_bytes, _ = _limits()
    if callable(ref):  # a corpus file, read on the host pool (``worker.hosting.images``)
        data = ref()
    elif isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
    elif isinstance(ref, str) and ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise ImageProblem("a data URI image must be base64 (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > max_bytes:
            raise ImageProblem(f"the image is over the limit of {max_bytes} bytes (EMBEDFLEET_IMAGE_MAX_BYTES)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageProblem("the data URI's payload is not valid base64") from None
    elif isinstance(ref, str) and ref.startswith(("http://", "https://")):
        data = _download(ref, max_bytes)
    elif isinstance(ref, str):
        raise ImageProblem("an image is given as a data: URI or an http(s) URL here (local paths and s3:// are "
                           "read by corpus jobs); send the file's bytes as a data URI")
    else:
        raise ImageProblem(f"an image input is bytes, a data: URI or an http(s) URL, not {type(ref).__name__}")
    if len(data) > max_bytes:
        raise ImageProblem(f"the image is over the limit of {max_bytes} bytes (EMBEDFLEET_IMAGE_MAX_BYTES)")
    if not data:
        raise ImageProblem("the image is empty (0 bytes)")
    return data


def _download(url: str, max_bytes: int) -> bytes:
    if not settings().image_fetch:
        raise ImageProblem("image URLs are not downloaded by these workers (EMBEDFLEET_IMAGE_FETCH is off); "
                           "send the image as a data URI")
    try:
        with urllib.request.urlopen(url, timeout=settings().image_fetch_timeout_s) as response:  # noqa: S310
            data = response.read(max_bytes + 1)
    except Exception as exc:  # every network failure is this input's reason
        raise ImageProblem(f"could not download the image: {type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageProblem(f"the image is over the limit of {max_bytes} bytes (EMBEDFLEET_IMAGE_MAX_BYTES)")
    return data


def decode(data: bytes) -> Any:
    """An RGB PIL image, its size checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    _, max_pixels = _limits()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageProblem("not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except Image.DecompressionBombError as exc:
        raise ImageProblem(f"a decompression bomb: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageProblem(f"the image is {width} x {height} = {width * height} pixels, over the limit of "
                           f"{max_pixels} (EMBEDFLEET_IMAGE_MAX_PIXELS)")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt data surfaces at decode
        raise ImageProblem(f"the image could not be decoded: {type(exc).__name__}: {exc}") from None


class Preprocessor:
    """The folder's image processor (resize, crop, rescale, normalize as its config says), PIL path."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoImageProcessor

        if not (path / "preprocessor_config.json").is_file():
            raise UnsupportedModel(f"model at {path}: an image-text model needs its preprocessor_config.json")
        self._processor = AutoImageProcessor.from_pretrained(str(path), use_fast=False)

    def __call__(self, ref: Any) -> np.ndarray:
        """One image input -> ``[3, H, W]`` float32 pixel values (``ImageProblem`` with the reason)."""
        image = decode(image_bytes(ref))
        return np.asarray(self._processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)
