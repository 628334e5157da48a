"""The onnx backend: export with pooling agrees with torch, the cache is reused and invalidated,
int8 keeps the quality rule where ORT's plain dynamic int8 does not, and unsupported dtypes/devices fail with clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from producer.jobs import JobKind  # noqa: E402
from worker.backends.select import load_backend  # noqa: E402
from worker.backends import onnx as onnx_backend  # noqa: E402
from worker.backends.base import Batch  # noqa: E402
from worker.models.tokenizer import BatchTokenizer  # noqa: E402
from worker.models.resolve import describe  # noqa: E402

from tests.conftest import export_cache_root  # noqa: E402

TEXTS = [
    "a short query",
    "embeddings map text to vectors so that similar meanings end up close together",
    "x",
    "onnx runtime fuses attention and layer normalization into single kernels for speed on cpus",
]
PAIRS = [("what is onnx", t) for t in TEXTS]


@pytest.fixture(autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Exports go to a per-session temporary cache, never the user's."""
    root = export_cache_root(tmp_path_factory)
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(root))
    return root / "onnx"


def make_batch(path: Path, inputs: list, max_length: int = 128) -> Batch:
    encoded = BatchTokenizer(path, max_length).encode(inputs)
    longest = max(e.n_tokens for e in encoded)
    ids = np.zeros((len(encoded), longest), np.int32)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, enc in enumerate(encoded):
        ids[row, : enc.n_tokens], types[row, : enc.n_tokens], mask[row, : enc.n_tokens] = enc.ids, enc.type_ids, 1
    return Batch(ids, mask, types, np.array([e.n_tokens for e in encoded], np.int32))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bundled_export_agrees_with_torch(bundled_model: Path) -> None:
    info = describe(str(bundled_model))
    batch = make_batch(info.path, TEXTS)
    reference = load_backend("torch", info, "cpu", "float32").backend.forward(batch)
    backend = load_backend("onnx", info, "cpu", "float32").backend
    values = backend.forward(batch)
    assert values.shape == (len(TEXTS), 384) and values.dtype == np.float32
    assert cosine(values, reference).min() > 0.99999
    np.testing.assert_allclose(values, reference, atol=1e-4)
    # padding must not leak into the pooled vector: alone or in a batch, the same vector
    alone = backend.forward(make_batch(info.path, TEXTS[2:3]))
    np.testing.assert_allclose(alone[0], values[2], atol=1e-4)
    # the transformer fusions were applied (that is where ORT's fp32 speed comes from)
    import onnx

    ops = {node.op_type for node in onnx.load(str(backend.path / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops


def test_bundled_int8_is_per_token_and_of_equal_quality_where_dynamic_int8_is_not(bundled_model: Path) -> None:
    """The backend's int8 (MatMulNBits, per-token activation scales) keeps the quality rule on real
    prose; ONNX Runtime's plain dynamic int8 (one activation scale per batch) of the same graph
    does not, and both really run int8 (neither equals fp32)."""
    import onnx
    import onnxruntime as ort

    from worker.backends.quality import agreement, prose
    from worker.backends.select import sorted_batches

    info = describe(str(bundled_model))
    texts = prose(240)
    rows, batches, _ = sorted_batches(info, texts, 2048)

    def embed(run) -> np.ndarray:  # type: ignore[no-untyped-def]
        out = np.zeros((len(texts), 384), np.float32)
        for index, batch in zip(rows, batches):
            out[index] = run(batch)
        return out

    fp32 = embed(load_backend("onnx", info, "cpu", "float32").backend.forward)
    int8 = load_backend("onnx", info, "cpu", "int8").backend
    assert int8.path.name.endswith(f"-int8tok{onnx_backend.onnx_int8.BLOCK}")
    graph = onnx.load(str(int8.path / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    constants = {init.name for init in graph.initializer}
    assert len(nbits) == 18 and not any(n.op_type == "MatMul" and n.input[1] in constants for n in graph.node)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    token = agreement(fp32, embed(int8.forward))
    assert token.equal_quality and token.cos_min < 0.99999  # equal quality, and really int8

    dynamic = ort.InferenceSession(str(onnx_backend.ensure_export(info, True, scheme="dynamic") / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    plain = agreement(fp32, embed(lambda b: dynamic.run(["output"], {
        "input_ids": b.input_ids.astype(np.int64), "attention_mask": b.attention_mask.astype(np.int64),
        "token_type_ids": b.token_type_ids.astype(np.int64)})[0]))
    assert not plain.equal_quality and plain.recall < token.recall and plain.cos_min < token.cos_min
    # precise=True (the engine's recompute for non-finite rows) runs the fp32 graph
    np.testing.assert_allclose(int8.forward(batches[0], precise=True), fp32[rows[0]], atol=1e-5)


@pytest.mark.parametrize("k", [64, 50])
def test_weights_are_int8_per_channel_and_block(k: int) -> None:
    """Each (output channel, block of 32 along K) has its own scale: a column of large weights
    does not coarsen the others; K that is no multiple of the block is zero-padded."""
    from worker.backends.onnx_int8 import BLOCK, dequantize_weight, quantize_weight

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 6)).astype(np.float32)
    weight[:, 0] *= 1000.0  # one outlier channel
    quantized, scales = quantize_weight(weight)
    blocks = -(-k // BLOCK)
    assert quantized.dtype == np.uint8 and quantized.shape == (6, blocks, BLOCK) and scales.shape == (6 * blocks,)
    back = dequantize_weight(quantized, scales, k)
    step = scales.reshape(6, blocks).repeat(BLOCK, axis=1)[:, :k].T
    assert np.all(np.abs(back - weight) <= step / 2 + 1e-6)
    assert np.abs(back[:, 1:] - weight[:, 1:]).max() < 0.05  # the outlier channel did not coarsen these


@pytest.mark.parametrize("fixture,inputs", [
    ("tiny_embed_model", TEXTS),      # CLS pooling
    ("tiny_xlmr_model", TEXTS),       # mean pooling, RoBERTa positions
    ("tiny_rerank_model", PAIRS),     # logits of pairs: token_type_ids matter
    ("tiny_classify_model", TEXTS),   # 3-label logits
])
def test_tiny_models_agree_with_torch(fixture: str, inputs: list, request: pytest.FixtureRequest) -> None:
    info = describe(str(request.getfixturevalue(fixture)))
    batch = make_batch(info.path, inputs, info.max_length)
    reference = load_backend("torch", info, "cpu", "float32").backend.forward(batch)
    values = load_backend("onnx", info, "cpu", "float32").backend.forward(batch)
    assert values.shape == reference.shape == (len(inputs), info.dims)
    np.testing.assert_allclose(values, reference, atol=2e-4)


def test_export_cache_reused_and_invalidated(tiny_embed_model: Path, tmp_path: Path, export_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_embed_model, model)
    info = describe(str(model))
    first = onnx_backend.ensure_export(info)
    assert first.parent == export_cache and first.name == f"{info.revision}-opset{onnx_backend.OPSET}-{onnx_backend.FUSION_LEVEL}"
    stamp = (first / "model.onnx").stat().st_mtime_ns

    def no_export(*_: object) -> None:
        raise AssertionError("the cached export should have been reused")

    monkeypatch.setattr(onnx_backend, "_export_fp32", no_export)
    assert onnx_backend.ensure_export(describe(str(model))) == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(export_cache.parent))

    # change the weights: a new revision, so a new export, whose output follows the new weights
    import torch
    from transformers import BertModel

    changed = BertModel.from_pretrained(str(model))
    with torch.no_grad():
        changed.encoder.layer[0].output.dense.weight.mul_(-1.0)
    changed.save_pretrained(str(model))
    new_info = describe(str(model))
    assert new_info.revision != info.revision
    second = onnx_backend.ensure_export(new_info)
    assert second != first and (first / "model.onnx").is_file()
    batch = make_batch(model, TEXTS, new_info.max_length)
    reference = load_backend("torch", new_info, "cpu", "float32").backend.forward(batch)
    np.testing.assert_allclose(load_backend("onnx", new_info, "cpu", "float32").backend.forward(batch), reference, atol=2e-4)
    # the int8 exports sit beside it under their own keys (per-token, and ORT's plain dynamic one)
    assert onnx_backend.ensure_export(new_info, quantized=True).name == second.name + "-int8tok32"
    assert onnx_backend.ensure_export(new_info, True, scheme="dynamic").name == second.name + "-int8"
    with pytest.raises(Exception, match="scheme"):
        onnx_backend.export_dir(new_info, True, scheme="static")


def test_engine_runs_on_the_onnx_backend(tiny_embed_model: Path) -> None:
    from worker.engine.pipeline import Engine

    info = describe(str(tiny_embed_model))
    with Engine(info, load_backend("onnx", info, "cpu", "float32").backend) as engine:
        onnx_result = engine.run(TEXTS, timeout=60)
    with Engine(info, load_backend("torch", info, "cpu", "float32").backend) as engine:
        torch_result = engine.run(TEXTS, timeout=60)
    assert info.kind == JobKind.embed and not onnx_result.errors
    np.testing.assert_allclose(onnx_result.values, torch_result.values, atol=2e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int4"])
def test_unsupported_dtype_is_refused(tiny_embed_model: Path, dtype: str) -> None:
    with pytest.raises(ValueError, match="float32.*int8"):
        load_backend("onnx", describe(str(tiny_embed_model)), "cpu", dtype)


def test_absent_execution_provider_is_a_clear_error(tiny_embed_model: Path) -> None:
    import onnxruntime

    info = describe(str(tiny_embed_model))
    for device, provider in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider")):
        if provider in onnxruntime.get_available_providers():
            continue
        with pytest.raises(ValueError, match="no (TensorRT|CUDA) provider"):
            load_backend("onnx", info, device, "float32").backend
    with pytest.raises(ValueError, match="not one the onnx backend runs on"):
        load_backend("onnx", info, "tpu", "float32").backend


def test_out_of_memory_is_recognised(tiny_embed_model: Path) -> None:
    backend = load_backend("onnx", describe(str(tiny_embed_model)), "cpu", "float32").backend
    assert backend.is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate memory for requested buffer"))
    assert not backend.is_out_of_memory(RuntimeError("Invalid input name"))
