"""The openvino backend: its IR with pooling agrees with torch fp32, bf16 is of equal quality on
real prose and really runs bf16, the IR cache is reused and keyed by model and OpenVINO release,
rerank scores agree, and unsupported dtypes/devices fail by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from worker.backends import openvino as ov_backend  # noqa: E402
from worker.backends import torch_cpu  # noqa: E402
from worker.backends.quality import agreement, cosines, prose  # noqa: E402
from worker.backends.select import candidates, load_backend, sorted_batches  # noqa: E402
from worker.models.resolve import describe  # noqa: E402

from tests.conftest import export_cache_root  # noqa: E402


@pytest.fixture(autouse=True)
def ir_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = export_cache_root(tmp_path_factory)
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(root))
    return root / "openvino"


def embed(backend, info, inputs: list) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows, batches, _ = sorted_batches(info, inputs, backend.preferred_batch_tokens)
    outputs = [backend.forward(batch) for batch in batches]
    out = np.zeros((len(inputs), outputs[0].shape[1]), np.float32)
    for index, output in zip(rows, outputs):
        out[index] = output
    return out


def test_bundled_fp32_agrees_with_torch_and_bf16_is_of_equal_quality(bundled_model: Path) -> None:
    info = describe(str(bundled_model))
    texts = prose(160)
    reference = embed(load_backend("torch", info, "cpu", "float32").backend, info, texts)
    fp32 = load_backend("openvino", info, "cpu", "float32").backend
    assert (fp32.name, fp32.dtype) == ("openvino", "float32")
    values = embed(fp32, info, texts)
    assert values.shape == (160, 384) and cosines(reference, values).min() > 0.99999
    # padding never leaks into the pooled vector: alone or in a batch, the same vector
    alone = embed(fp32, info, texts[3:4])
    np.testing.assert_allclose(alone[0], values[3], atol=1e-4)
    if not torch_cpu.bf16_native():
        pytest.skip("no bf16 units on this CPU")
    bf16 = load_backend("openvino", info, "cpu", "bfloat16").backend
    bf16_values = embed(bf16, info, texts)
    assert agreement(reference, bf16_values).equal_quality
    assert not np.allclose(bf16_values, values, atol=1e-6)  # it really ran in bf16
    precise = bf16.forward(sorted_batches(info, texts[:4], 2048)[1][0], precise=True)
    assert np.isfinite(precise).all()


def test_the_ir_is_cached_and_keyed_by_model_and_release(tiny_embed_model: Path, bundled_model: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a cache of its own: the conversion happens here, not in another test sharing the run's cache
    ir_cache = tmp_path / "cache" / "openvino"
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(ir_cache.parent))
    tiny, bundled = describe(str(tiny_embed_model)), describe(str(bundled_model))
    first = load_backend("openvino", tiny, "cpu", "float32").backend
    assert first.path.parent == ir_cache and (first.path / "model.xml").is_file()
    assert tiny.revision in first.path.name and not list(ir_cache.glob(".*"))  # no temporary folder left
    monkeypatch.setattr(ov_backend, "_convert", lambda info, dest: pytest.fail("converted again"))
    again = load_backend("openvino", tiny, "cpu", "float32").backend
    assert again.path == first.path
    assert ov_backend.ir_dir(bundled) != first.path  # another model, another folder
    monkeypatch.setattr(ov_backend.metadata, "version", lambda name: "9999.1.0")
    assert ov_backend.ir_dir(tiny) != first.path and "ov9999.1" in ov_backend.ir_dir(tiny).name


def test_streams_run_batches_side_by_side_with_the_same_results(bundled_model: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two streams: two batches in flight at once (launch returns before the batch is done), each
    wait gets its own batch's vectors, equal to one stream's; the stream count is the backend's
    mode, defaults to one per core (at most two), and a negative count is refused by name."""
    info = describe(str(bundled_model))
    texts = prose(48)
    _, batches, _ = sorted_batches(info, texts, 512)
    one = ov_backend.OpenVinoBackend(info, "cpu", "float32", streams=1)
    two = ov_backend.OpenVinoBackend(info, "cpu", "float32", streams=2)
    assert (one.asynchronous, one.mode, two.asynchronous, two.mode) == (False, "streams1", True, "streams2")
    expected = [one.forward(batch) for batch in batches]
    waits = [two.launch(batch) for batch in batches[:2]]  # both start before either is waited for
    got = [wait() for wait in reversed(waits)][::-1] + [two.launch(batch)() for batch in batches[2:]]
    assert len(got) == len(expected) >= 3
    for a, b in zip(got, expected):
        assert a.shape == b.shape and cosines(b, a).min() > 0.99999
    assert ov_backend.stream_count() == min(2, ov_backend.cpu_threads())
    assert ov_backend.OpenVinoBackend(info, "cpu", "float32").streams == ov_backend.stream_count()
    monkeypatch.setattr(ov_backend, "cpu_threads", lambda: 1)
    assert ov_backend.stream_count() == 1
    monkeypatch.setattr(ov_backend, "cpu_threads", lambda: 5)
    assert ov_backend.stream_count() == 2 and ov_backend.stream_count(3) == 3
    monkeypatch.setenv("EMBEDFLEET_OPENVINO_STREAMS", "1")
    assert ov_backend.stream_count() == 1
    with pytest.raises(ValueError, match="openvino streams must be 0"):
        ov_backend.stream_count(-1)


def test_rerank_scores_agree_with_torch(tiny_rerank_model: Path) -> None:
    info = describe(str(tiny_rerank_model))
    pairs = [("what is openvino", t) for t in prose(12)]
    reference = embed(load_backend("torch", info, "cpu", "float32").backend, info, pairs)
    values = embed(load_backend("openvino", info, "cpu", "float32").backend, info, pairs)
    np.testing.assert_allclose(values, reference, atol=1e-4)


def test_unsupported_dtypes_and_devices_fail_by_name(tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = describe(str(tiny_embed_model))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported by the openvino backend"):
        load_backend("openvino", info, "cpu", "int8")
    with pytest.raises(ValueError, match="device 'cuda' is not one the openvino backend runs on"):
        load_backend("openvino", info, "cuda", "float32")
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ValueError, match="needs a CPU with bf16 units"):
        load_backend("openvino", info, "cpu", "bfloat16")
    assert "openvino/bfloat16" not in {str(c) for c in candidates("cpu", "auto")}


def test_auto_selection_offers_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = {str(c) for c in candidates("cpu", "auto")}
    assert "openvino/float32" in offered
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert "openvino/bfloat16" in {str(c) for c in candidates("cpu", "bf16")}
