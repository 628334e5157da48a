"""SPLADE against sentence-transformers' SparseEncoder itself, on tiny random BertForMaskedLM
folders saved by SparseEncoder.save (``tests.families.save_splade``): max and sum pooling, the
log1p_relu activation, the query/document prompts, top-k pruning (``max_active_dims``), and the
folders this family does not implement refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producer.errors import BadInput, UnsupportedModel
from producer.jobs import Options
from worker.models.resolve import describe

from tests.families import save_splade, tiny_splade_model  # noqa: F401  (fixture)
from tests.fixtures_extra import make_engine, sample_texts

TEXTS = [t[:300] for t in sample_texts(8)] + ["word", "the the the same word repeated the the"]


def st_rows(path: Path, texts: list[str], **kwargs) -> list[dict[int, float]]:  # type: ignore[no-untyped-def]
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(path), device="cpu")
    encode = {"query": model.encode_query, "document": model.encode_document}.get(kwargs.pop("task", ""), model.encode)
    dense = encode(texts, convert_to_sparse_tensor=False, **kwargs).numpy()
    return [{int(i): float(row[i]) for i in np.flatnonzero(row)} for row in dense]


def assert_rows_match(result, expected: list[dict[int, float]]) -> None:  # type: ignore[no-untyped-def]
    assert not result.errors
    for (indices, values), want in zip(result.sparse, expected):
        assert indices.tolist() == sorted(want)
        np.testing.assert_allclose(values, [want[i] for i in indices.tolist()], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def splade_engine(tiny_splade_model: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_splade_model, max_batch_tokens=400)
    yield engine
    engine.stop()


def test_describe(tiny_splade_model: Path) -> None:
    info = describe(str(tiny_splade_model))
    assert info.family == "splade" and info.outputs == ("sparse",) and info.default_outputs == ("sparse",)
    assert info.vocab_size == 30522 and info.splade is not None and info.splade.pooling == "max"
    assert info.dims == 30522  # as SparseEncoder.get_sentence_embedding_dimension: the vocabulary


def test_matches_sparse_encoder(splade_engine, tiny_splade_model: Path) -> None:  # type: ignore[no-untyped-def]
    result = splade_engine.run(TEXTS)  # no outputs named: the model's own (sparse)
    assert result.outputs == ("sparse",) and result.values.shape == (len(TEXTS), 0)
    assert_rows_match(result, st_rows(tiny_splade_model, TEXTS))


def test_query_and_document_prompts(splade_engine, tiny_splade_model: Path) -> None:  # type: ignore[no-untyped-def]
    assert_rows_match(splade_engine.run(TEXTS[:4], Options(prompt_name="query")),
                      st_rows(tiny_splade_model, TEXTS[:4], task="query"))
    assert_rows_match(splade_engine.run(TEXTS[:4], Options(prompt_name="document")),
                      st_rows(tiny_splade_model, TEXTS[:4], task="document"))


def test_top_k_pruning(splade_engine, tiny_splade_model: Path) -> None:  # type: ignore[no-untyped-def]
    result = splade_engine.run(TEXTS, Options(max_active_dims=16))
    assert all(count == 16 for count in result.sparse.counts)
    assert_rows_match(result, st_rows(tiny_splade_model, TEXTS, max_active_dims=16))


@pytest.mark.parametrize(("pooling", "activation"), [("sum", "relu"), ("max", "log1p_relu")])
def test_other_pooling_variants(tmp_path: Path, pooling: str, activation: str) -> None:
    folder = save_splade(tmp_path / f"splade-{pooling}-{activation}", pooling=pooling, activation=activation)
    engine = make_engine(folder)
    try:
        assert_rows_match(engine.run(TEXTS[:4]), st_rows(folder, TEXTS[:4]))
    finally:
        engine.stop()


def test_dense_is_not_offered_and_prune_needs_sparse(splade_engine, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInput, match="does not give dense"):
        splade_engine.run(["x"], Options(outputs=["dense"]))
    dense = make_engine(tiny_embed_model)
    try:
        with pytest.raises(BadInput, match="max_active_dims prunes sparse vectors"):
            dense.run(["x"], Options(max_active_dims=4))
    finally:
        dense.stop()


def test_sparse_folders_of_other_shapes_are_refused(tmp_path: Path) -> None:
    folder = save_splade(tmp_path / "router")
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["type"] = "sentence_transformers.base.modules.router.Router"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModel, match="sparse encoder made of Router -> SpladePooling is not supported"):
        describe(str(folder))


def test_backends_without_splade_refuse_it(tiny_splade_model: Path) -> None:
    from worker.backends.torch import TorchBackend
    from worker.engine.pipeline import Engine
    from worker.models.loading import transformers_only

    from tests.fixtures_extra import WrappedBackend

    info = describe(str(tiny_splade_model))
    with pytest.raises(BadInput, match="SPLADE sparse encoder .*use --backend torch"):
        transformers_only(info, "onnx")
    dense_only = WrappedBackend(TorchBackend(info, device="cpu", dtype="float32"))  # a backend of dense vectors only
    with pytest.raises(UnsupportedModel, match="gives sparse outputs, which the .* backend does not compute"):
        Engine(info, dense_only)
