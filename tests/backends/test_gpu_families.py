"""The native families on a GPU (skipped without CUDA): JinaBERT's ALiBi attention with fp32
scores, bias and softmax in bf16 and fp16, an 8,192-token input, and a decoder reranker in bf16,
each against fp32. The bar is the issue's: embeddings' cosine to fp32 >= 0.9999; rerank scores
within 0.01 of fp32's (the auto selection's gate, ``worker.backends.select.SCORE_TOLERANCE``).

On the H200: ``python -m pytest -q tests/backends/test_gpu_families.py`` (about a minute).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from producer.jobs import Options
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import describe

from tests.families import save_jina, save_qwen3_causal_lm
from tests.fixtures_extra import cosine_rows, sample_texts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COS_MIN = 0.9999
SCORE_TOLERANCE = 0.01


def _run(info, device: str, dtype: str, inputs: list, options: Options | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    engine = Engine(info, TorchBackend(info, device, dtype), max_batch_tokens=32768).start()
    try:
        result = engine.run(inputs, options, timeout=600)
    finally:
        engine.stop()
    assert not result.errors, result.errors
    return result.values


def _long_texts() -> list[str]:
    corpus = sample_texts(3000, step=3)
    texts = [" ".join(corpus[i : i + n]) for i, n in ((0, 5), (10, 40), (60, 150), (300, 400))]
    return sample_texts(6, step=41) + texts + [" ".join(corpus)[:99_000]]  # the last one: 8,192 tokens


@pytest.fixture(scope="module")
def jina(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_jina(tmp_path_factory.mktemp("gpu") / "jina", hidden=128, heads=8, intermediate=256, layers=4, seed=2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_jina_alibi_on_cuda_against_fp32(jina: Path, dtype: str) -> None:
    info = describe(str(jina))
    texts = _long_texts()
    reference = _run(info, "cpu", "float32", texts)
    got = _run(info, "cuda", dtype, texts)
    assert np.isfinite(got).all()
    cos = cosine_rows(got, reference)
    assert cos.min() >= COS_MIN, f"{dtype}: cosine per text {np.round(cos, 6)}"
    full = _run(info, "cuda", "float32", texts)
    assert cosine_rows(full, reference).min() >= 0.99999


def test_decoder_reranker_on_cuda_in_bf16(tmp_path: Path) -> None:
    texts = sample_texts(600, step=7)
    folder = save_qwen3_causal_lm(tmp_path / "tiny-qwen3-reranker", texts, max_length=512)
    info = describe(str(folder))
    pairs = [("what is python", d) for d in sample_texts(12, step=101)] + [("long", " ".join(texts[:80]))]
    reference = _run(info, "cpu", "float32", pairs, Options(raw_scores=True))
    got = _run(info, "cuda", "bfloat16", pairs, Options(raw_scores=True))
    assert np.isfinite(got).all()
    delta = np.abs(1 / (1 + np.exp(-got)) - 1 / (1 + np.exp(-reference)))
    assert delta.max() <= SCORE_TOLERANCE, delta
