"""The openvino backend: its IR with pooling agrees with torch fp32, bf16 is of equal quality on
real prose and really runs bf16, int8 (per-channel weights, per-token activations) is of equal
quality and really quantizes its activations, the IR cache is reused and keyed by model, OpenVINO
release and int8 scheme, rerank scores agree, and unsupported dtypes/devices fail by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from worker.backends import openvino as ov_backend  # noqa: E402
from worker.backends import openvino_graph  # noqa: E402
from worker.backends import openvino_int8 as ov_int8  # noqa: E402
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
    # mean pooling reads every row: only Q/K/V merged (two MatMuls fewer in each of 6 layers)
    assert json.loads((fp32.path / "export.json").read_text())["edits"] == {"merged_matmuls": 12}
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
    assert first.path.name.endswith("-sdpa-qkv1-cls1")  # CLS pooled: its last layer runs one row
    assert ov_backend.ir_dir(bundled).name.endswith("-sdpa-qkv1")  # mean pooled: Q/K/V merged only
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


@pytest.mark.skipif(not ov_int8.int8_native(), reason="no int8 dot products (VNNI/AMX) on this CPU")
def test_a_reranker_int8_ir_keeps_no_roles_and_its_scores_stay_close(tiny_rerank_model: Path) -> None:
    """Scores have no neighbours to recall, so a reranker's int8 IR keeps no roles (the auto
    selection's score gate judges it), with nothing measured for roles; its 1-channel head stays
    fp32 (int8 there gave -77.7 for -0.015 on two streams), so its scores stay close to fp32's."""
    import json

    info = describe(str(tiny_rerank_model))
    int8 = load_backend("openvino", info, "cpu", "int8").backend
    export = json.loads((int8.path / "export.json").read_text())
    assert export["kept_bf16"] == [] and export["calibration_recall"] == []
    pairs = [("what is openvino", t) for t in prose(12)]
    reference = embed(load_backend("openvino", info, "cpu", "float32").backend, info, pairs)
    assert np.abs(embed(int8, info, pairs) - reference).max() < 0.05


def test_unsupported_dtypes_and_devices_fail_by_name(tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = describe(str(tiny_embed_model))
    with pytest.raises(ValueError, match="dtype 'float16' is not supported by the openvino backend"):
        load_backend("openvino", info, "cpu", "float16")
    with pytest.raises(ValueError, match="device 'cuda' is not one the openvino backend runs on"):
        load_backend("openvino", info, "cuda", "float32")
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ValueError, match="needs a CPU with bf16 units"):
        load_backend("openvino", info, "cpu", "bfloat16")
    with pytest.raises(ValueError, match="dtype 'int8' on the openvino backend needs a CPU with int8 dot products"):
        load_backend("openvino", info, "cpu", "int8")  # AVX2 only: the plugin would decompress to fp32
    offered = {str(c) for c in candidates("cpu", "auto")}
    assert "openvino/bfloat16" not in offered and "openvino/int8" not in offered


def test_auto_selection_offers_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = {str(c) for c in candidates("cpu", "auto")}
    assert "openvino/float32" in offered
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert "openvino/bfloat16" in {str(c) for c in candidates("cpu", "bf16")}
    assert "openvino/int8" not in {str(c) for c in candidates("cpu", "auto")}  # bf16 units, no VNNI
    for units in ({"avx2", "avx_vnni"}, {"avx512f", "avx512_vnni"}, {"amx_tile", "amx_int8"}):
        monkeypatch.setattr(torch_cpu, "cpu_flags", lambda units=units: frozenset(units))
        assert "openvino/int8" in {str(c) for c in candidates("cpu", "int8")}


def test_int8_weights_are_symmetric_per_output_channel() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 40)).astype(np.float32)
    weight[3] *= 50  # one large row keeps its own scale: the others lose nothing to it
    quantized, scales = ov_int8.quantize_channels(weight)
    assert quantized.dtype == np.int8 and scales.shape == (48, 1)
    np.testing.assert_allclose(scales[:, 0], np.abs(weight).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(quantized).max() == 127 and (np.abs(quantized).max(axis=1) == 127).all()
    error = np.abs(quantized * scales - weight)
    assert (error <= scales / 2 + 1e-6).all()


@pytest.mark.skipif(not ov_int8.int8_native(), reason="no int8 dot products (VNNI/AMX) on this CPU")
def test_bundled_int8_is_of_equal_quality_and_quantizes_activations_per_token(bundled_model: Path,
                                                                              ir_cache: Path) -> None:
    """The int8 IR (weights int8 per channel, activations per token at run time) keeps the rule
    against torch fp32 on real prose; it is cached in its own folder; and the activations really
    are quantized: the same IR without the plugin's dynamic quantization gives other vectors (on
    a CPU where the plugin ignores it, they would be identical, as measured on AVX2)."""
    import openvino as ov

    info = describe(str(bundled_model))
    texts = prose(200)
    reference = embed(load_backend("torch", info, "cpu", "float32").backend, info, texts)
    int8 = load_backend("openvino", info, "cpu", "int8").backend
    assert (int8.name, int8.dtype) == ("openvino", "int8")
    assert int8.path == ov_backend.ir_dir(info, int8=True) != ov_backend.ir_dir(info)
    assert int8.path.name.endswith("-" + ov_int8.weight_scheme()) and int8.path.parent == ir_cache
    values = embed(int8, info, texts)
    measured = agreement(reference, values)
    assert measured.equal_quality and measured.cos_min < 0.9999, measured  # int8, not fp32
    xml = (int8.path / "model.xml").read_text()
    assert 'element_type="i8"' in xml
    core = ov.Core()
    plain = core.compile_model(core.read_model(str(int8.path / "model.xml")), "CPU",
                               {"INFERENCE_PRECISION_HINT": ov_backend._precision("int8"),
                                "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "INFERENCE_NUM_THREADS": 2})
    batch = sorted_batches(info, texts[:8], 2048)[1][0]
    feed = {name: getattr(batch, name).astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    weights_only = np.array(plain.create_infer_request().infer(feed)[0])
    assert not np.allclose(weights_only, int8.forward(batch), atol=1e-5)
    precise = int8.forward(batch, precise=True)
    fp32 = load_backend("openvino", info, "cpu", "float32").backend.forward(batch)
    np.testing.assert_allclose(precise, fp32, atol=1e-5)


def test_smoothing_factors_favour_the_large_input_channels() -> None:
    """An input channel with large activations gets a factor above the rest (its weights grow, its
    input shrinks), the factors' geometric mean is 1, and alpha 0 with equal weight columns is no change."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    peak = np.ones(16, np.float32)
    peak[5] = 40.0
    factors = ov_int8.smoothing_factors(peak, rows, alpha=0.5)
    assert factors.shape == (16,) and factors.argmax() == 5 and factors[5] > 3 * np.median(factors)
    assert abs(np.exp(np.log(factors).mean()) - 1) < 1e-5
    flat = ov_int8.smoothing_factors(peak, [np.ones((4, 16), np.float32)], alpha=0.0)
    np.testing.assert_allclose(flat, 1.0, rtol=1e-6)


def _ir_outputs(model, batch) -> np.ndarray:  # type: ignore[no-untyped-def]
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    names = [port.get_any_name() for port in compiled.inputs]
    feed = {name: getattr(batch, name).astype(np.int64) for name in names}
    return np.array(compiled.create_infer_request().infer(feed)[0])


def test_smoothing_alone_leaves_the_fp32_outputs_unchanged(tiny_embed_model: Path) -> None:
    """Smoothing is exact in real arithmetic: the fp32 IR smoothed with every role kept (weights
    still fp32) gives the same vectors; the input ranges are one per weight group, of its input
    width, from real tokens only, and the calibration's reference is the fp32 IR's own output."""
    import openvino as ov

    info = describe(str(tiny_embed_model))
    path = ov_backend.ensure_ir(info)
    model = ov.Core().read_model(str(path / "model.xml"))
    batch = sorted_batches(info, prose(6), 2048)[1][0]
    before = _ir_outputs(model, batch)
    names = [port.get_any_name() for port in model.inputs]
    feeds, masks = ov_backend._calibration(info, names)
    ranges, reference = ov_int8.calibrate(model, feeds, masks)
    groups = ov_int8.weight_groups(model)
    first_weight = np.array(groups[0][0].input_value(1).get_node().get_data())
    assert len(ranges) == len(groups) > 0
    assert [r.shape[0] for r in ranges] == [ov_int8._rows(g[0]).shape[1] for g in groups]
    assert all(np.isfinite(r).all() and (r > 0).all() for r in ranges)
    assert reference.shape == (sum(len(m) for m in masks), 32)
    np.testing.assert_allclose(reference[: len(masks[0])], _ir_outputs(model, _batch(feeds[0])), atol=1e-5)
    roles = ov_int8.roles(model)
    # merged Q/K/V, attention output, FFN up and down, and the last layer's first-row Q (openvino_graph)
    assert len(roles) == 5 and sum(roles.values()) == sum(ov_int8._rows(n).size for n in ov_int8.constant_matmuls(model))
    assert ov_int8.rewrite_weights(model, ranges, keep=set(roles)) == 0  # smoothed, nothing int8
    after = _ir_outputs(model, batch)
    assert cosines(before, after).min() > 0.99999
    smoothed_weight = ov_int8.weight_groups(model)[0][0].input_value(1).get_node().get_data()
    assert not np.allclose(smoothed_weight, first_weight)  # the weights did change
    assert set(ov_int8.roles(model)) == set(roles)  # the smoothing's Multiply does not change a role


def _batch(feed: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    from worker.backends.base import Batch

    mask = feed["attention_mask"]
    return Batch(feed["input_ids"], mask, feed.get("token_type_ids", np.zeros_like(mask)), mask.sum(axis=1))


def test_sensitive_roles_keeps_the_fewest_that_reach_the_target() -> None:
    """Nothing kept when the all-int8 IR reaches the target; else the role gaining the most recall
    per weight kept is kept first, one at a time, until the target is met; and never every role."""
    sizes = {"qkv": 3, "out": 1, "up": 4, "down": 4}
    gains = {"qkv": 0.002, "out": 0.004, "up": 0.01, "down": 0.02}
    seen: list[frozenset[str]] = []

    def recall(kept: frozenset[str]) -> float:
        seen.append(kept)
        return 0.93 + sum(gains[name] for name in kept)

    kept, tried = ov_int8.sensitive_roles(recall, sizes, target=0.96)
    # per weight kept: down 0.005 > out 0.004 > up 0.0025 > qkv 0.0007; 0.93 + 0.02 + 0.004 < 0.96 <= + 0.01
    assert kept == {"down", "out", "up"}
    assert [sorted(k) for k, _ in tried] == [[], ["down"], ["out"], ["qkv"], ["up"], ["down", "out"], ["down", "qkv"],
                                            ["down", "up"], ["down", "out", "qkv"], ["down", "out", "up"]]
    assert tried[0] == (frozenset(), 0.93) and seen == [k for k, _ in tried] and tried[-1][1] >= 0.96
    assert ov_int8.sensitive_roles(recall, sizes, target=0.9) == (frozenset(), [(frozenset(), 0.93)])
    kept, _ = ov_int8.sensitive_roles(recall, sizes, target=1.5)  # unreachable: one role stays int8
    assert len(kept) == len(sizes) - 1


@pytest.mark.skipif(not ov_int8.int8_native(), reason="no int8 dot products (VNNI/AMX) on this CPU")
def test_a_mixed_ir_keeps_its_roles_in_bf16_and_is_closer_to_fp32(bundled_model: Path, tiny_embed_model: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the bundled model, the FFN's down projections kept in bf16 (the rest int8): the kept
    MatMuls read fp32 weights, the others int8; the vectors are of equal quality against torch
    fp32 on real prose and closer to fp32 than the all-int8 IR's. And the int8 IR built with a
    calibration target no int8 IR reaches keeps all roles but one, and says so in export.json."""
    import openvino as ov

    info = describe(str(bundled_model))
    fp32_ir = ov_backend.ensure_ir(info)
    core = ov.Core()
    texts = prose(200)
    _, batches, _ = sorted_batches(info, texts, 2048)
    names = [port.get_any_name() for port in core.read_model(str(fp32_ir / "model.xml")).inputs]
    feeds = [{n: getattr(b, n).astype(np.int64) for n in names} for b in batches]
    config = {"INFERENCE_PRECISION_HINT": ov_backend._precision("int8"), "INFERENCE_NUM_THREADS": 2,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": ov_int8.ACTIVATION_GROUP}
    reference = ov_int8.outputs(core.read_model(str(fp32_ir / "model.xml")), feeds, {"INFERENCE_PRECISION_HINT": "f32"})
    ranges, _ = ov_int8.calibrate(core.read_model(str(fp32_ir / "model.xml")), *ov_backend._calibration(info, names))
    down = next(name for name in ov_int8.roles(core.read_model(str(fp32_ir / "model.xml"))) if name.endswith("<-Gelu"))
    mixed, full = core.read_model(str(fp32_ir / "model.xml")), core.read_model(str(fp32_ir / "model.xml"))
    # 6 layers of 4 MatMuls (Q/K/V merged: openvino_graph), the 6 FFN down ones kept
    assert ov_int8.rewrite_weights(mixed, ranges, keep={down}) == 18 and ov_int8.rewrite_weights(full, ranges) == 24
    kept = [n for n in ov_int8.constant_matmuls(mixed)]  # only the kept ones still read an fp32 constant
    assert len(kept) == 6 and {ov_int8.role(n) for n in kept} == {down}
    mixed_values, full_values = ov_int8.outputs(mixed, feeds, config), ov_int8.outputs(full, feeds, config)
    measured = agreement(reference, mixed_values)
    assert measured.equal_quality and measured.cos_min < 0.99999, measured  # int8, not fp32
    assert (1 - cosines(reference, mixed_values)).mean() < (1 - cosines(reference, full_values)).mean()

    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ov_int8, "CALIBRATION_RECALL", 1.01)
    tiny = describe(str(tiny_embed_model))
    int8 = load_backend("openvino", tiny, "cpu", "int8").backend
    assert int8.path.name.endswith(f"-keep1010g{ov_int8.ACTIVATION_GROUP}n{ov_int8.MIN_CHANNELS}")
    export = __import__("json").loads((int8.path / "export.json").read_text())
    assert len(export["kept_bf16"]) == 4 and export["calibration_recall"][0]["kept"] == []  # of 5 roles
    assert (int8.path / "model.xml").read_text().count('element_type="i8"') >= 1  # the one role left int8


@pytest.mark.skipif(not ov_int8.int8_native(), reason="no int8 dot products (VNNI/AMX) on this CPU")
def test_smoothing_lowers_the_int8_error_on_the_bundled_model(bundled_model: Path) -> None:
    """On the real MiniLM (outlier channels), the same int8 weights and activation groups are
    closer to fp32 with the smoothing than without it: the reason the smoothing is there."""
    import openvino as ov

    info = describe(str(bundled_model))
    fp32_ir = ov_backend.ensure_ir(info)
    core = ov.Core()
    texts = prose(200)[120:200]  # not the calibration paragraphs (those follow the quality sample)
    _, batches, _ = sorted_batches(info, texts, 2048)
    config = {"INFERENCE_PRECISION_HINT": ov_backend._precision("int8"), "INFERENCE_NUM_THREADS": 2,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": ov_int8.ACTIVATION_GROUP}

    def run(model, hint: dict) -> np.ndarray:  # type: ignore[no-untyped-def]
        compiled = core.compile_model(model, "CPU", hint)
        names = [port.get_any_name() for port in compiled.inputs]
        request = compiled.create_infer_request()
        return np.concatenate([np.array(request.infer({n: getattr(b, n).astype(np.int64) for n in names})[0])
                               for b in batches])

    reference = run(core.read_model(str(fp32_ir / "model.xml")), {"INFERENCE_PRECISION_HINT": "f32"})
    plain = core.read_model(str(fp32_ir / "model.xml"))
    ov_int8.rewrite_weights(plain)  # no ranges: int8 without smoothing
    smoothed = core.read_model(str(fp32_ir / "model.xml"))
    names = [port.get_any_name() for port in smoothed.inputs]
    ov_int8.rewrite_weights(smoothed, ov_int8.calibrate(smoothed, *ov_backend._calibration(info, names))[0])
    plain_error = 1 - cosines(reference, run(plain, config))
    smoothed_error = 1 - cosines(reference, run(smoothed, config))
    assert smoothed_error.mean() < 0.8 * plain_error.mean(), (smoothed_error.mean(), plain_error.mean())


def test_the_int8_ir_is_keyed_by_its_smoothing_and_kept_roles(bundled_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    info = describe(str(bundled_model))
    default = ov_backend.ir_dir(info, int8=True)
    keep = f"-keep{round(ov_int8.CALIBRATION_RECALL * 1000)}g{ov_int8.ACTIVATION_GROUP}n{ov_int8.MIN_CHANNELS}"
    assert default.name.endswith(f"-i8ch-sq{round(ov_int8.SMOOTHING_ALPHA * 100)}c{ov_int8.CALIBRATION_TEXTS}{keep}")
    monkeypatch.setattr(ov_int8, "SMOOTHING_ALPHA", 0.4)
    assert ov_backend.ir_dir(info, int8=True).name.endswith(f"-i8ch-sq40c{ov_int8.CALIBRATION_TEXTS}{keep}")
    monkeypatch.setattr(ov_int8, "CALIBRATION_TEXTS", 100)
    assert ov_backend.ir_dir(info, int8=True).name.endswith(f"-i8ch-sq40c100{keep}")
    monkeypatch.setattr(ov_int8, "CALIBRATION_RECALL", 0.99)
    assert ov_backend.ir_dir(info, int8=True).name.endswith(f"-i8ch-sq40c100-keep990g{ov_int8.ACTIVATION_GROUP}n16")
    monkeypatch.setattr(ov_int8, "ACTIVATION_GROUP", 32)  # the kept roles were chosen at another group
    assert ov_backend.ir_dir(info, int8=True).name.endswith("-i8ch-sq40c100-keep990g32n16")
    assert ov_backend.ir_dir(info) != default


def test_a_cls_model_runs_its_last_layer_on_the_first_row_with_torchs_vectors(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))  # 2 layers, CLS pooling
    texts = prose(48)
    reference = embed(load_backend("torch", info, "cpu", "float32").backend, info, texts)
    backend = load_backend("openvino", info, "cpu", "float32").backend
    edits = json.loads((backend.path / "export.json").read_text())["edits"]
    assert edits == {"last_layer_first_row": "yes", "merged_matmuls": 3}  # layer 0: Q/K/V; layer 1: K/V
    import openvino as ov

    model = ov.Core().read_model(str(backend.path / "model.xml"))
    one_row = [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"
               and n.get_output_partial_shape(0)[1].get_max_length() == 1]  # [?, ..1, C]: at most one row
    assert len(one_row) == 4  # the last layer's Q, attention output, FFN up and down
    values = embed(backend, info, texts)
    assert cosines(reference, values).min() > 0.99999
    np.testing.assert_allclose(embed(backend, info, texts[5:6])[0], values[5], atol=1e-5)  # padding stays out


def test_a_graph_without_the_expected_last_layer_is_left_as_converted() -> None:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, -1, 8], ov.Type.f32, name="x")
    weight = ops.constant(np.ones((4, 8), np.float32))
    model = ov.Model([ops.matmul(x, weight, False, True)], [x])
    assert openvino_graph.first_token_last_layer(model) == "no ScaledDotProductAttention op"
    assert openvino_graph.fuse_projections(model) == 0  # one MatMul reads x: nothing to merge
