"""bge-m3's three outputs (dense, sparse lexical weights, ColBERT vectors) from one forward pass,
against a reference written here from FlagEmbedding's definition (``EncoderOnlyEmbedderM3Model``
and ``M3Embedder.encode_single_device``), on a tiny random XLM-R with random heads saved in
FlagEmbedding's layout (``tests.families.save_bge_m3``).

The reference runs transformers' model on a padded batch with transformers' tokenizer, and
finishes the rows the way FlagEmbedding does (a dict per input for the sparse weights, the
padded ColBERT rows cut at ``tokens_num - 1``); it shares no code with ``worker.models.bge_m3``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.errors import BadInput, UnsupportedModel
from producer.jobs import Options
from worker.models.resolve import describe

from tests.families import save_bge_m3, tiny_bge_m3_model  # noqa: F401  (fixture)
from tests.fixtures_extra import EDGE_TEXTS, make_engine, sample_texts, tiny_embed_engine  # noqa: F401

TEXTS = sample_texts(10) + EDGE_TEXTS + ["the the the same word repeated the the"]


def flag_reference(path: Path, texts: list[str]) -> dict[str, list]:
    """FlagEmbedding's M3 inference (normalize_embeddings=True, cls pooling), in fp32."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    hidden = model.config.hidden_size
    colbert_state = torch.load(path / "colbert_linear.pt", map_location="cpu")
    colbert = torch.nn.Linear(hidden, colbert_state["weight"].shape[0])
    colbert.load_state_dict(colbert_state)
    sparse = torch.nn.Linear(hidden, 1)
    sparse.load_state_dict(torch.load(path / "sparse_linear.pt", map_location="cpu"))
    unused = {tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[t])
              for t in ("cls_token", "eos_token", "pad_token", "unk_token") if t in tokenizer.special_tokens_map}
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        last = model(**inputs, return_dict=True).last_hidden_state
        dense = torch.nn.functional.normalize(last[:, 0], dim=-1)
        weights = torch.relu(sparse(last)).squeeze(-1)
        vecs = colbert(last[:, 1:]) * inputs["attention_mask"][:, 1:][:, :, None].float()
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
    lexical = []
    for w_row, ids in zip(weights.numpy(), inputs["input_ids"].numpy().tolist()):
        result: dict[str, float] = defaultdict(int)
        for w, idx in zip(w_row, ids):
            if idx not in unused and w > 0 and w > result[str(idx)]:
                result[str(idx)] = w
        lexical.append(dict(result))
    colbert_vecs = [v[: int(m.sum()) - 1] for v, m in zip(vecs.numpy(), inputs["attention_mask"].numpy())]
    return {"dense": list(dense.numpy()), "sparse": lexical, "multivector": colbert_vecs}


@pytest.fixture(scope="module")
def m3_engine(tiny_bge_m3_model: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_bge_m3_model, max_batch_tokens=600)  # several batches of mixed lengths
    yield engine
    engine.stop()


def test_describe_offers_the_heads_and_defaults_to_dense(tiny_bge_m3_model: Path) -> None:
    info = describe(str(tiny_bge_m3_model))
    assert info.outputs == ("dense", "sparse", "multivector")
    assert info.default_outputs == ("dense",)  # FlagEmbedding's encode: return_dense only, unless asked
    assert info.multivector_dims == 24 and info.vocab_size == 30522 and info.pooling == "cls"


def test_three_outputs_match_flagembedding(m3_engine, tiny_bge_m3_model: Path) -> None:  # type: ignore[no-untyped-def]
    ref = flag_reference(tiny_bge_m3_model, TEXTS)
    result = m3_engine.run(TEXTS, Options(outputs=["dense", "sparse", "multivector"]))
    assert not result.errors and result.outputs == ("dense", "sparse", "multivector")
    np.testing.assert_allclose(result.values, np.stack(ref["dense"]), atol=2e-5)
    for i, expected in enumerate(ref["sparse"]):
        indices, values = result.sparse[i]
        assert list(indices) == sorted(int(k) for k in expected), i  # every id kept, sorted, no specials
        np.testing.assert_allclose(values, [expected[str(k)] for k in indices], atol=2e-5)
        assert (values > 0).all() and indices.dtype == np.int32 and values.dtype == np.float32
    for i, expected in enumerate(ref["multivector"]):
        got = result.multivector[i]
        assert got.shape == expected.shape == (result.n_tokens[i] - 1, 24), i
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_only_what_is_asked_is_computed(m3_engine) -> None:  # type: ignore[no-untyped-def]
    sparse_only = m3_engine.run(TEXTS[:4], Options(outputs=["sparse"]))
    assert sparse_only.values.shape == (4, 0) and sparse_only.multivector is None
    both = m3_engine.run(TEXTS[:4], Options(outputs=["dense", "sparse", "multivector"]))
    for a, b in zip(sparse_only.sparse, both.sparse):
        np.testing.assert_array_equal(a.indices, b.indices)
    dense = m3_engine.run(TEXTS[:4])  # the default: dense only, the path every dense model takes
    assert dense.sparse is None and dense.multivector is None and dense.outputs == ("dense",)
    np.testing.assert_allclose(dense.values, both.values, atol=1e-6)


def test_concurrent_requests_with_different_outputs_share_batches(m3_engine) -> None:  # type: ignore[no-untyped-def]
    futures = [m3_engine.submit(TEXTS, Options(outputs=outputs)) for outputs in
               (["dense"], ["sparse"], ["multivector"], ["dense", "multivector"], None)]
    results = [f.result(60) for f in futures]
    full = m3_engine.run(TEXTS, Options(outputs=["dense", "sparse", "multivector"]))
    np.testing.assert_allclose(results[0].values, full.values, atol=1e-6)
    np.testing.assert_allclose(results[2].multivector.vectors, full.multivector.vectors, atol=1e-6)
    np.testing.assert_allclose(results[1].sparse.values, full.sparse.values, atol=1e-6)
    assert results[3].sparse is None and results[3].values.shape == full.values.shape
    assert results[4].outputs == ("dense",)


def test_a_bad_input_fails_alone_with_empty_rows(m3_engine) -> None:  # type: ignore[no-untyped-def]
    result = m3_engine.run(["fine text", "", "another"], Options(outputs=["sparse", "multivector"]))
    assert list(result.errors) == [1]
    assert result.sparse.counts[1] == 0 and result.multivector.counts[1] == 0
    assert result.sparse.counts[0] > 0 and result.multivector.counts[2] == result.n_tokens[2] - 1


def test_outputs_the_model_does_not_give_are_refused_by_name(tiny_embed_engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInput, match="does not give sparse .*it gives dense"):
        tiny_embed_engine.run(["x"], Options(outputs=["sparse"]))
    with pytest.raises(ValueError, match="unknown output 'colbert'"):
        Options(outputs=["colbert"])


def test_heads_that_do_not_fit_the_encoder_are_refused(tmp_path: Path) -> None:
    folder = save_bge_m3(tmp_path / "bad-m3")
    torch.save(torch.nn.Linear(16, 1).state_dict(), folder / "sparse_linear.pt")
    with pytest.raises(UnsupportedModel, match=r"sparse_linear.pt has weight \(1, 16\).*hidden size 32"):
        make_engine(folder)
    torch.save({"weight": torch.zeros(1, 32)}, folder / "sparse_linear.pt")
    with pytest.raises(UnsupportedModel, match="sparse_linear.pt must hold a Linear layer's weight and bias"):
        make_engine(folder)


def test_a_folder_with_one_head_offers_that_one(tmp_path: Path) -> None:
    info = describe(str(save_bge_m3(tmp_path / "sparse-only", heads=("sparse",))))
    assert info.outputs == ("dense", "sparse") and info.multivector_dims == 0


def test_an_input_whose_outputs_stay_non_finite_fails_alone_the_others_keep_their_rows(
        tiny_bge_m3_model: Path) -> None:
    """``_deliver_outputs``: dense rows go in by index, sparse and ColBERT rows one by one; an
    input still NaN in a wider type fails alone, and every other input gets its own rows."""
    from tests.fixtures_extra import WrappedBackend, first_token_id

    class NanDense(WrappedBackend):
        poison: set[int] = set()

        @property
        def outputs(self) -> tuple[str, ...]:
            return self.inner.outputs

        def launch_outputs(self, batch, outputs, precise=False):  # type: ignore[no-untyped-def]
            wait = self.inner.launch_outputs(batch, outputs, precise)

            def done():  # type: ignore[no-untyped-def]
                out = wait()
                rows = [i for i, row in enumerate(batch.input_ids) if int(row[1]) in self.poison]
                if rows and out.dense is not None:
                    out.dense = out.dense.copy()
                    out.dense[rows] = np.nan
                return out
            return done

    engine = make_engine(tiny_bge_m3_model, max_batch_tokens=600, wrap=NanDense)
    try:
        options = Options(outputs=["dense", "sparse", "multivector"])
        alone = [engine.run([text], options, timeout=60) for text in TEXTS]  # one input a batch: no rows to mix up
        dense = engine.run(TEXTS, timeout=60).values  # dense only: ``_deliver``, not ``_deliver_outputs``
        NanDense.poison = {first_token_id(engine, "zebra")}
        texts = [*TEXTS[:3], "zebra crossing", *TEXTS[3:]]
        result = engine.run(texts, options, timeout=60)
        assert list(result.errors) == [3] and "non-finite" in result.errors[3]
        others = [i for i in range(len(texts)) if i != 3]
        np.testing.assert_allclose(result.values[others], dense, atol=1e-5)
        assert (result.values[3] == 0).all() and result.sparse.counts[3] == 0 and result.multivector.counts[3] == 0
        assert [result.sparse.counts[i] for i in others] == [one.sparse.counts[0] for one in alone]
        np.testing.assert_allclose(result.sparse.values, np.concatenate([one.sparse.values for one in alone]),
                                   atol=1e-5)
        np.testing.assert_allclose(result.multivector.vectors,
                                   np.concatenate([one.multivector.vectors for one in alone]), atol=1e-5)
    finally:
        NanDense.poison = set()
        engine.stop()
