"""The equal-quality rule: recall@10 against fp32 and per-vector cosine, on real prose.

The rule's arithmetic on vectors whose answer is known, then every CPU backend/dtype of the
bundled model against torch fp32 on a small sample of real paragraphs (the rule the auto
selection applies, and what bench/cpu.py measures on the 12,000-text corpus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.backends import quality
from worker.backends.quality import Agreement, agreement, neighbours, prose, query_rows, recall_at_k
from worker.backends.select import load_backend, sorted_batches
from worker.backends.torch_cpu import bf16_native
from worker.models.resolve import describe

from tests.conftest import export_cache_root


@pytest.fixture(autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(export_cache_root(tmp_path_factory)))


def test_neighbours_exclude_the_query_itself() -> None:
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    top = neighbours(vectors, np.array([0, 2]), k=1)
    assert top.tolist() == [[1], [3]]


def test_recall_is_one_for_the_same_vectors_and_low_for_unrelated_ones() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((300, 32)).astype(np.float32)
    queries = query_rows(300, 100)
    assert recall_at_k(reference, reference * 3.0, queries) == 1.0  # scale does not matter
    unrelated = rng.standard_normal((300, 32)).astype(np.float32)
    assert recall_at_k(reference, unrelated, queries) < 0.2
    # a small perturbation keeps most neighbours, a large one loses them: recall is graded
    small = recall_at_k(reference, reference + 0.05 * unrelated, queries)
    large = recall_at_k(reference, reference + 0.8 * unrelated, queries)
    assert 0.9 < small < 1.0 and large < small


def test_the_rule_needs_both_recall_and_cosine() -> None:
    assert Agreement(0.97, 0.99, 0.999).equal_quality
    assert not Agreement(0.96, 0.999, 0.9999).equal_quality
    assert not Agreement(1.0, 0.989, 0.9999).equal_quality
    assert not Agreement(float("nan"), 1.0, 1.0).equal_quality
    nan = np.full((4, 3), np.nan, np.float32)
    assert not agreement(np.ones((4, 3), np.float32), nan).equal_quality


def test_query_rows_spread_over_the_corpus() -> None:
    rows = query_rows(12000, 1000)
    assert len(rows) == len(set(rows.tolist())) == 1000 and rows[0] == 0 and rows[-1] == 11999
    assert query_rows(5, 1000).tolist() == [0, 1, 2, 3, 4]


def test_prose_is_real_deterministic_english() -> None:
    texts = prose(200)
    assert texts == prose(200) and len(set(texts)) == 200
    assert all(5 <= len(t.split()) <= 200 for t in texts)
    assert sum("the" in t.lower().split() for t in texts) > 100  # sentences, not code


def _embed(backend, info, texts: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows, batches, _ = sorted_batches(info, texts, backend.preferred_batch_tokens)
    out = np.zeros((len(texts), info.dims), np.float32)
    for index, batch in zip(rows, batches):
        out[index] = backend.forward(batch)
    return out


def test_cpu_candidates_of_the_bundled_model_against_the_rule(bundled_model: Path) -> None:
    """fp32 (ONNX) and bf16 are of equal quality; the onnx backend's int8 is measured and its
    verdict is whatever the numbers say, but it must be visibly lossier than fp32."""
    info = describe(str(bundled_model))
    texts = prose(240)
    fp32 = _embed(load_backend("torch", info, "cpu", "float32").backend, info, texts)
    onnx_fp32 = agreement(fp32, _embed(load_backend("onnx", info, "cpu", "float32").backend, info, texts))
    assert onnx_fp32.equal_quality and onnx_fp32.cos_min > 0.9999
    int8 = agreement(fp32, _embed(load_backend("onnx", info, "cpu", "int8").backend, info, texts))
    assert 0.8 < int8.cos_min < 0.9999 and int8.recall <= 1.0
    if bf16_native():
        bf16 = agreement(fp32, _embed(load_backend("torch", info, "cpu", "bfloat16").backend, info, texts))
        assert bf16.equal_quality and bf16.cos_min > int8.cos_min
    assert quality.RECALL_GATE == 0.97 and quality.COSINE_GATE == 0.99  # the rule of the CPU issue
