"""Embeddings on the wire: JSON floats, base64, and the quantized types Cohere and Voyage define.

One module so every route (OpenAI's ``encoding_format``, Voyage's ``output_dtype``, Cohere's
``embedding_types``, TEI's float lists) encodes a vector the same way. The definitions:

* ``float``: float32 values (orjson writes each one's shortest exact float32 form).
* ``int8``: each vector scaled on its own so its largest magnitude maps to 127, rounded to the
  nearest integer: ``round(127 * v / max|v|)`` in [-127, 127]. Cohere defines int8 as the
  signed 8-bit form of each vector (values in [-128, 127]) and publishes no scale of its own;
  scaling per vector keeps the whole range for every vector, and cosine and dot-product order
  survive it.
* ``uint8``: the same grid shifted into [0, 255]: ``int8 + 128`` (so ``uint8 - 128 == int8``).
* ``ubinary``: Cohere's unsigned binary: one bit per dimension, 1 where the value is > 0, packed
  8 to a byte, most significant bit first (``numpy.packbits``); ``ceil(dims / 8)`` bytes.
* ``binary``: Cohere's signed binary: the ``ubinary`` bytes minus 128, as int8.
* ``base64``: the little-endian bytes of one of the above (float32 unless another type is asked
  for, as OpenAI's, vLLM's and Voyage's clients decode them).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pybase64

Quantized = Literal["int8", "uint8", "binary", "ubinary"]
NumericType = Literal["float", "int8", "uint8", "binary", "ubinary"]
NUMERIC_TYPES: tuple[str, ...] = ("float", "int8", "uint8", "binary", "ubinary")


def to_int8(vectors: np.ndarray) -> np.ndarray:
    """Per-vector symmetric scaling to [-127, 127] (a zero vector stays zero)."""
    values = np.asarray(vectors, dtype=np.float32)
    peak = np.abs(values).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, 127.0 / np.maximum(peak, 1e-30), 0.0)
    return np.clip(np.rint(values * scale), -128, 127).astype(np.int8)


def to_uint8(vectors: np.ndarray) -> np.ndarray:
    return (to_int8(vectors).astype(np.int16) + 128).astype(np.uint8)


def to_ubinary(vectors: np.ndarray) -> np.ndarray:
    """Sign bits (1 for > 0), 8 per byte, most significant bit first."""
    return np.packbits(np.asarray(vectors) > 0, axis=1, bitorder="big")


def to_binary(vectors: np.ndarray) -> np.ndarray:
    return (to_ubinary(vectors).astype(np.int16) - 128).astype(np.int8)


_CONVERT = {"int8": to_int8, "uint8": to_uint8, "binary": to_binary, "ubinary": to_ubinary}


def as_type(vectors: np.ndarray, kind: str) -> np.ndarray:
    """The vectors in numeric type ``kind`` (``float``: float32)."""
    if kind == "float":
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return _CONVERT[kind](vectors)


def json_rows(vectors: np.ndarray, kind: str = "float") -> list[Any]:
    """One JSON-ready row per vector: float32 arrays (orjson writes them), or lists of ints."""
    values = as_type(vectors, kind)
    if kind == "float":
        return list(values)
    return values.astype(np.int64).tolist()


def base64_rows(vectors: np.ndarray, kind: str = "float", float_dtype: str = "float32",
                byteorder: str = "little") -> list[str]:
    """Base64 of each row's bytes: float32 (or float16) in ``byteorder``, or the quantized bytes."""
    if kind == "float":
        code = ">" if byteorder == "big" else "<"
        values = np.ascontiguousarray(vectors, dtype=np.dtype(f"{code}f{2 if float_dtype == 'float16' else 4}"))
    else:
        values = as_type(vectors, kind)
    return [pybase64.b64encode_as_string(row.tobytes()) for row in values]
