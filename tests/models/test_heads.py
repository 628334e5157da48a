"""Pooling, normalization, Matryoshka and the rerank / classify heads against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.models.heads import class_probabilities, finish_embeddings, pool, pool_varlen, rerank_scores

LENGTHS = [5, 1, 3, 7]


@pytest.fixture
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(len(LENGTHS), max(LENGTHS), 6)
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
        hidden[row, n:] = 1e4  # padding garbage that must never leak into a pooled vector
    return hidden, mask


def _expected(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    rows = []
    for row, n in enumerate(LENGTHS):
        real = hidden[row, :n]
        rows.append({
            "cls": real[0],
            "mean": real.mean(0),
            "mean_sqrt_len": real.sum(0) / np.sqrt(n),
            "max": real.max(0).values,
            "lasttoken": real[-1],
        }[mode])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["cls", "mean", "mean_sqrt_len", "max", "lasttoken"])
def test_pool_ignores_padding(padded, mode: str) -> None:  # type: ignore[no-untyped-def]
    hidden, mask = padded
    torch.testing.assert_close(pool(hidden, mask, mode), _expected(hidden, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["cls", "mean", "mean_sqrt_len", "max", "lasttoken"])
def test_pool_varlen_equals_padded_pool(padded, mode: str) -> None:  # type: ignore[no-untyped-def]
    hidden, mask = padded
    packed = torch.cat([hidden[row, :n] for row, n in enumerate(LENGTHS)])
    cu = torch.tensor([0, *np.cumsum(LENGTHS)], dtype=torch.int32)
    torch.testing.assert_close(pool_varlen(packed, cu, mode), pool(hidden, mask, mode), rtol=1e-5, atol=1e-5)


def test_pool_mean_in_half_precision_accumulates_in_float32() -> None:
    hidden = torch.full((1, 4096, 4), 60.0, dtype=torch.float16)  # a float16 sum would overflow (65504)
    mask = torch.ones(1, 4096, dtype=torch.long)
    out = pool(hidden, mask, "mean")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full((1, 4), 60.0))


@pytest.mark.parametrize("func", [pool, pool_varlen])
def test_unknown_pooling_mode_is_named(func) -> None:  # type: ignore[no-untyped-def]
    arg = torch.ones(2, 2, dtype=torch.long) if func is pool else torch.tensor([0, 2])
    with pytest.raises(ValueError, match="pooling mode 'weird'"):
        func(torch.zeros(2, 2, 3) if func is pool else torch.zeros(2, 3), arg, "weird")


def test_finish_embeddings_matryoshka_then_renormalize() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 16)).astype(np.float32)
    out = finish_embeddings(vectors, normalize=True, dimensions=4)
    want = vectors[:, :4] / np.linalg.norm(vectors[:, :4], axis=1, keepdims=True)
    assert out.shape == (5, 4) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, want, rtol=1e-6)
    raw = finish_embeddings(vectors, normalize=False, dimensions=None)
    np.testing.assert_array_equal(raw, vectors)
    unnormalized_cut = finish_embeddings(vectors, normalize=False, dimensions=3)
    np.testing.assert_array_equal(unnormalized_cut, vectors[:, :3])


def test_finish_embeddings_in_place_divides_the_callers_array_and_only_an_uncut_one() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 16)).astype(np.float32)
    want = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    owned = vectors.copy()
    out = finish_embeddings(owned, normalize=True, dimensions=None, in_place=True)
    assert out is owned or np.shares_memory(out, owned)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    kept = vectors.copy()
    copied = finish_embeddings(kept, normalize=True, dimensions=None)
    np.testing.assert_array_equal(kept, vectors)  # without in_place the caller's array is left alone
    np.testing.assert_allclose(copied, want, rtol=1e-6)
    cut_source = vectors.copy()
    cut = finish_embeddings(cut_source, normalize=True, dimensions=4, in_place=True)
    np.testing.assert_array_equal(cut_source, vectors)  # a cut is a new array: the source is not written
    np.testing.assert_allclose(cut, vectors[:, :4] / np.linalg.norm(vectors[:, :4], axis=1, keepdims=True), rtol=1e-6)
    zeros = np.zeros((2, 3), np.float32)
    assert (finish_embeddings(zeros, normalize=True, dimensions=None, in_place=True) == 0).all()


def test_finish_embeddings_zero_vector_stays_finite() -> None:
    out = finish_embeddings(np.zeros((2, 3), np.float32), normalize=True, dimensions=None)
    assert np.isfinite(out).all() and (out == 0).all()


def test_rerank_scores_sigmoid_or_raw() -> None:
    logits = np.array([[-3.0], [0.0], [2.5], [40.0]], dtype=np.float32)
    np.testing.assert_allclose(rerank_scores(logits, raw=False), 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-6)
    np.testing.assert_array_equal(rerank_scores(logits, raw=True), logits[:, 0])
    assert rerank_scores(logits, raw=False).dtype == np.float32


def test_class_probabilities_softmax_and_multilabel() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    probs = class_probabilities(logits, multi_label=False)
    torch_probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(probs, torch_probs, rtol=1e-6, atol=1e-7)
    assert np.isfinite(probs).all()
    multi = class_probabilities(logits[:1], multi_label=True)
    np.testing.assert_allclose(multi, torch.sigmoid(torch.from_numpy(logits[:1])).numpy(), rtol=1e-6)
