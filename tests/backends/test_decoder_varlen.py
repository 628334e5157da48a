"""The unpadded Qwen3 decoder (``worker.backends.decoder``) against transformers' ``Qwen3Model``
on tiny random weights, on the CPU where CI runs: every packed token's state, the last-token
pooled and normalized vectors through the engine (to 1e-4 in fp32), and the refusals of what it
does not implement. The CUDA kernels (flash varlen, causal, GQA) are checked against the same
reference by tests/backends/test_gpu_families.py on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from producer.errors import BadInput
from worker.backends.base import Batch
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import describe

from tests.families import save_qwen3_embedding
from tests.fixtures_extra import sample_texts


@pytest.fixture(scope="module")
def qwen3_embedding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen3_embedding(tmp_path_factory.mktemp("decoder") / "tiny-qwen3-embedding", sample_texts(400, step=7))


def _packed(rng: np.random.Generator, lengths: list[int], vocab: int) -> tuple[Batch, list[np.ndarray]]:
    ids = [rng.integers(5, vocab, size=n).astype(np.int32) for n in lengths]
    return Batch.pack(ids, [np.zeros(n, dtype=np.int32) for n in lengths]), ids


def _positions(cu: np.ndarray, total: int) -> torch.Tensor:
    return torch.from_numpy(np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], np.diff(cu)))


def test_every_packed_token_equals_qwen3model(qwen3_embedding: Path) -> None:
    """Each packed token's final state equals transformers' at the same position of the same text
    (right-padded batch, causal): lengths 1 to 70 in one batch, GQA, q/k norms, RoPE per position."""
    from transformers import AutoModel

    from worker.backends.decoder import build_decoder

    reference = AutoModel.from_pretrained(str(qwen3_embedding), attn_implementation="sdpa").eval()
    decoder = build_decoder(AutoModel.from_pretrained(str(qwen3_embedding)).eval())
    rng = np.random.default_rng(11)
    lengths = [70, 1, 33, 2, 64, 17, 5]
    batch, ids = _packed(rng, lengths, reference.config.vocab_size)
    cu = batch.cu_seqlens
    padded = np.zeros((len(ids), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(padded)
    for row, x in enumerate(ids):
        padded[row, : len(x)] = x
        mask[row, : len(x)] = 1
    with torch.inference_mode():
        expected = reference(input_ids=torch.from_numpy(padded), attention_mask=torch.from_numpy(mask)).last_hidden_state
        got = decoder(torch.from_numpy(batch.input_ids), None, _positions(cu, int(cu[-1])),
                      torch.from_numpy(cu), max(lengths))
    want = expected[torch.from_numpy(mask).bool()]
    assert got.shape == want.shape
    assert float(want.abs().mean()) > 0.1  # the states are not all alike (a test that can fail)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _run(info, varlen: bool, texts: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    backend = TorchBackend(info, "cpu", "float32", varlen=varlen)
    assert backend.unpadded is varlen
    engine = Engine(info, backend, max_batch_tokens=4096).start()
    try:
        result = engine.run(texts, timeout=300)
    finally:
        engine.stop()
    assert not result.errors, result.errors
    return result.values


def test_engine_vectors_equal_the_generic_path(qwen3_embedding: Path) -> None:
    """Last-token pooled, normalized vectors of the packed path equal the padded transformers path."""
    info = describe(str(qwen3_embedding))
    assert info.pooling == "lasttoken" and info.model_type == "qwen3"
    corpus = sample_texts(600, step=5)
    texts = corpus[:40] + [" ".join(corpus[i : i + n]) for i, n in ((0, 30), (50, 120), (200, 300))]
    generic = _run(info, False, texts)
    packed = _run(info, True, texts)
    assert np.allclose(np.linalg.norm(packed, axis=1), 1.0, atol=1e-5)
    spread = 1 - (generic @ generic.T)[np.triu_indices(len(texts), 1)]
    assert spread.max() > 0.05  # distinct texts give distinct vectors
    np.testing.assert_allclose(packed, generic, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config, why", [
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
])
def test_what_it_does_not_implement_is_refused(tmp_path: Path, config: dict, why: str) -> None:
    """varlen=True on such a config is a clear error naming it; the default keeps the generic path."""
    folder = save_qwen3_embedding(tmp_path / "odd-qwen3", sample_texts(200, step=3), **config)
    info = describe(str(folder))
    with pytest.raises(BadInput, match=why):
        TorchBackend(info, "cpu", "float32", varlen=True)
    assert not TorchBackend(info, "cpu", "float32").unpadded


def test_the_fp16_recompute_in_bf16_runs_the_decoder(qwen3_embedding: Path) -> None:
    """An fp16 decoder's non-finite recompute (``precise``: autocast to bf16, weights kept in fp16)
    mixes dtypes through the layers; it still gives the fp32 vectors (to bf16's precision)."""
    info = describe(str(qwen3_embedding))
    rng = np.random.default_rng(3)
    batch, _ = _packed(rng, [40, 1, 12, 25], 400)
    fp32 = TorchBackend(info, "cpu", "float32", varlen=True).forward(batch)
    half = TorchBackend(info, "cpu", "float16", varlen=True)
    precise = half.forward(batch, precise=True)
    assert np.isfinite(precise).all()
    cos = (precise * fp32).sum(1) / np.linalg.norm(precise, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() >= 0.999, cos
