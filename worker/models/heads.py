"""Pooling, normalization, Matryoshka truncation, and the rerank and classify heads.

Pooling runs on the device (it shrinks ``[batch, seq, hidden]`` to ``[batch, hidden]`` before
anything is copied back); everything after it is cheap per-row numpy work done off the device
thread, where each request's own options (dimensions, normalization, raw scores) apply.
"""

from __future__ import annotations

import numpy as np
import torch

from producer.errors import UnsupportedModel


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce token states ``[B, T, H]`` to one vector per input, as sentence-transformers does."""
    if mode == "cls":
        return hidden[:, 0]
    mask_f = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean" or mode == "mean_sqrt_len":
        summed = (hidden * mask_f).sum(dim=1, dtype=torch.float32)
        counts = mask_f.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
        return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
    if mode == "max":
        floor = torch.finfo(hidden.dtype).min
        return hidden.masked_fill(mask_f == 0, floor).max(dim=1).values
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise UnsupportedModel(f"pooling mode {mode!r} is not supported (cls, mean, max, lasttoken, mean_sqrt_len)")


def pool_varlen(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool packed token states ``[total, H]`` whose sequences start at ``cu_seqlens[:-1]``."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    if mode == "cls":  # an empty sequence (a CUDA graph's unused slot) starts past the last row
        return hidden[starts.clamp(max=hidden.shape[0] - 1)]
    if mode == "lasttoken":
        return hidden[ends - 1]
    lengths = (ends - starts).to(torch.float32)
    # output_size: the total is known on the host, so the device is not asked for it. Without it
    # repeat_interleave copies the lengths' sum back, a sync that waits for the batch's whole
    # forward pass. (Its removal did not change the H200's bulk figures: the launch there was as
    # long as the batch because launching it eagerly is CPU-bound for a small model, not because
    # of a sync; worker.backends.varlen.GraphedEncoder. Inside a CUDA graph it must not sync.)
    segment = torch.repeat_interleave(torch.arange(len(starts), device=hidden.device), (ends - starts),
                                      output_size=hidden.shape[0])
    if mode in ("mean", "mean_sqrt_len"):
        out = torch.zeros(len(starts), hidden.shape[1], device=hidden.device, dtype=torch.float32)
        out.index_add_(0, segment, hidden.to(torch.float32))
        return out / (lengths.sqrt() if mode == "mean_sqrt_len" else lengths).unsqueeze(1)
    if mode == "max":
        out = torch.full((len(starts), hidden.shape[1]), float("-inf"), device=hidden.device, dtype=hidden.dtype)
        return out.index_reduce_(0, segment, hidden, "amax")
    raise UnsupportedModel(f"pooling mode {mode!r} is not supported (cls, mean, max, lasttoken, mean_sqrt_len)")


def finish_embeddings(vectors: np.ndarray, normalize: bool, dimensions: int | None,
                      in_place: bool = False) -> np.ndarray:
    """Matryoshka-truncate to ``dimensions`` (if given), then L2-normalize (if asked).

    ``in_place``: the caller owns ``vectors`` (the engine's per-request output), so an uncut
    float32 one is divided where it is. The norms come from ``einsum`` (no squared copy), so a
    2,000-text request of MiniLM no longer makes two 3 MB temporaries (``np.linalg.norm``'s
    squares and the quotient): each a pass over memory and, on the engine's threads, fresh pages
    to fault in (issue 13: short texts, where the host's CPU per text sets the rate)."""
    out = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        out = out[:, :dimensions]
    if normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
        np.maximum(norms, 1e-12, out=norms)
        if in_place and out is vectors and out.flags.c_contiguous and out.flags.writeable:
            np.divide(out, norms, out=out)
        else:
            out = out / norms
    return np.ascontiguousarray(out, dtype=np.float32)


def rerank_scores(logits: np.ndarray, raw: bool) -> np.ndarray:
    """One relevance score per pair: sigmoid of the logit (in [0, 1]), or the logit itself."""
    flat = np.asarray(logits, dtype=np.float32).reshape(len(logits), -1)[:, 0]
    return flat if raw else (1.0 / (1.0 + np.exp(-flat))).astype(np.float32)


def class_probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Per-label probabilities: softmax, or an independent sigmoid for multi-label models."""
    logits = np.asarray(logits, dtype=np.float32)
    if multi_label:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k_sparse(indices: np.ndarray, values: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` weights of largest magnitude (sentence-transformers' ``max_active_dims``), still
    sorted by index; ``None`` keeps all."""
    if k is None or len(values) <= k:
        return indices, values
    keep = np.sort(np.argpartition(-np.abs(values), k - 1)[:k])
    return indices[keep], values[keep]
