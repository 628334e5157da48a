"""``Backend.token_states`` (TEI's /embed_all): every token's final hidden state, as transformers
gives it; backends without it refuse by name. The CUDA cases run on a GPU machine only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.backends.torch import TorchBackend
from worker.models.resolve import describe
from worker.models.tokenizer import BatchTokenizer

TEXTS = ["a short one", "a somewhat longer text, with a comma and more words in it"]


def _batch(info, texts):  # type: ignore[no-untyped-def]
    from worker.backends.base import Batch

    encoded = BatchTokenizer(info.path, info.max_length).encode(texts)
    lengths = np.array([e.n_tokens for e in encoded], dtype=np.int32)
    ids = np.zeros((len(texts), int(lengths.max())), dtype=np.int32)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : e.n_tokens], mask[row, : e.n_tokens] = e.ids, 1
    return Batch(ids, mask, np.zeros_like(ids), lengths)


def _reference(path: Path, texts: list[str]) -> list[np.ndarray]:
    from transformers import AutoModel, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    # float32 whatever the folder stores (transformers 5 loads a checkpoint in its own dtype: the
    # H200 kit ships the bundled model in fp16, and the reference then ran in fp16)
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(**hf(t, return_tensors="pt")).last_hidden_state[0].numpy() for t in texts]


def test_cpu_token_states_are_the_models(bundled_model: Path) -> None:
    info = describe(str(bundled_model))
    backend = TorchBackend(info, device="cpu", dtype="float32")
    states = backend.token_states(_batch(info, TEXTS))
    for got, want in zip(states, _reference(bundled_model, TEXTS)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_backends_without_token_states_refuse_by_name(tiny_rerank_model: Path) -> None:
    from producer.errors import BadInput
    from worker.backends.base import Backend

    with pytest.raises(BadInput, match="does not return token embeddings"):
        Backend().token_states(None)  # type: ignore[arg-type]
    info = describe(str(tiny_rerank_model))
    with pytest.raises(BadInput, match="is a rerank model"):
        TorchBackend(info, device="cpu", dtype="float32").token_states(_batch(info, TEXTS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_padded_token_states_and_the_unpadded_refusal(bundled_model: Path) -> None:
    from producer.errors import BadInput

    info = describe(str(bundled_model))
    padded = TorchBackend(info, device="cuda", dtype="float32", varlen=False)
    for got, want in zip(padded.token_states(_batch(info, TEXTS)), _reference(bundled_model, TEXTS)):
        np.testing.assert_allclose(got, want, atol=1e-3)
    unpadded = TorchBackend(info, device="cuda", dtype="bfloat16")
    assert unpadded.unpadded
    with pytest.raises(BadInput, match="unpadded CUDA encoder"):
        unpadded.token_states(_batch(info, TEXTS))
