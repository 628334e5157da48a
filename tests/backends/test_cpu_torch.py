"""The torch CPU path: bf16 meets the quality gate on real weights, the CPU probe is right, and a
CPU without bf16 units still runs bf16 (emulated) with a warning instead of failing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.backends.quality import COSINE_GATE
from worker.backends.select import candidates, sample_inputs, sorted_batches
from worker.backends import torch_cpu
from worker.backends.select import load_backend
from worker.models.resolve import describe


def run_all(backend, info, inputs) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows, batches, _ = sorted_batches(info, inputs, 2048)
    out = np.zeros((len(inputs), info.dims), np.float32)
    for index, batch in zip(rows, batches):
        out[index] = backend.forward(batch)
    return out


def test_bf16_meets_the_quality_gate_on_the_bundled_model(bundled_model: Path) -> None:
    info = describe(str(bundled_model))
    inputs = sample_inputs(info, 24)
    fp32 = run_all(load_backend("torch", info, "cpu", "float32").backend, info, inputs)
    bf16_backend = load_backend("torch", info, "cpu", "bfloat16").backend
    assert bf16_backend.dtype == "bfloat16"
    assert next(bf16_backend.model.parameters()).dtype == torch.bfloat16  # the dtype asked for is used
    bf16 = run_all(bf16_backend, info, inputs)
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() >= COSINE_GATE
    assert not np.array_equal(fp32, bf16)  # it really ran in bf16


def test_cpu_probe_matches_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert torch_cpu.bf16_native() and not torch_cpu.fp16_native()
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_fp16"}))
    assert torch_cpu.bf16_native() and torch_cpu.fp16_native()
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not torch_cpu.bf16_native()
    # without bf16 units, auto selection does not even try bf16 (it would be emulated and slow)
    assert "bfloat16" not in {c.dtype for c in candidates("cpu", "auto")}
    assert "AVX" in torch_cpu.describe_cpu() or "DEFAULT" in torch_cpu.describe_cpu()


def test_bf16_without_units_runs_with_a_warning(tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch_cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    info = describe(str(tiny_embed_model))
    with caplog.at_level(logging.WARNING, logger="worker.backends.torch_cpu"):
        backend = load_backend("torch", info, "cpu", "bfloat16").backend
    assert "emulated" in caplog.text
    out = run_all(backend, info, sample_inputs(info, 4))
    assert np.isfinite(out).all() and backend.dtype == "bfloat16"


def test_threads_follow_the_cores_this_process_may_use(tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        load_backend("torch", describe(str(tiny_embed_model)), "cpu", "float32")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compiled_cpu_path_matches_eager(tiny_rerank_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMBEDFLEET_TORCH_COMPILE=1 compiles forward in place: same scores, pairs keep token_type_ids."""
    info = describe(str(tiny_rerank_model))
    pairs = sample_inputs(info, 6)
    eager = run_all(load_backend("torch", info, "cpu", "float32").backend, info, pairs)
    monkeypatch.setenv(torch_cpu.COMPILE_ENV, "1")
    import torch._inductor.config as inductor_config

    # compile in this process: a pool of compile subprocesses (one per core) costs more than the
    # tiny model's kernels on the 2-core CI machine
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    backend = load_backend("torch", info, "cpu", "float32").backend
    assert backend._takes_type_ids  # the compiled forward still shows its real signature
    compiled = run_all(backend, info, pairs)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
