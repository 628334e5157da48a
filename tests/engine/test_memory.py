"""The memory profiler's arithmetic: line fit, budget, profile sizes, cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.backends.base import Backend, Batch
from worker.engine import memory
from worker.engine.memory import MemoryProfile, budget_tokens, fit_line, next_sizes

GIB = 1 << 30


def test_fit_line_recovers_fixed_and_per_token_cost() -> None:
    samples = [(t, 300_000_000 + 20_000 * t) for t in (4096, 8192, 16384, 32768)]
    fixed, per_token = fit_line(samples)
    assert fixed == pytest.approx(300_000_000, rel=1e-9)
    assert per_token == pytest.approx(20_000, rel=1e-9)


def test_fit_line_one_sample_and_negative_intercept_stay_cautious() -> None:
    assert fit_line([(1000, 5_000_000)]) == (0.0, 5000.0)
    # bytes growing faster than linearly give a negative intercept: use the origin line instead
    fixed, per_token = fit_line([(1000, 1_000_000), (2000, 4_000_000), (4000, 16_000_000)])
    assert fixed == 0.0 and per_token * 4000 >= 16_000_000
    with pytest.raises(ValueError):
        fit_line([])


def test_budget_fits_the_fraction_with_headroom() -> None:
    free = 60 * GIB
    budget = budget_tokens(free, 0.5, fixed_bytes=GIB, bytes_per_token=100_000, maximum=10**9)
    assert budget % 1024 == 0
    assert GIB + budget * 100_000 * memory.SAFETY <= free * 0.5
    assert GIB + (budget + 1024) * 100_000 * memory.SAFETY > free * 0.5  # the largest that fits


def test_budget_clamps_and_validates() -> None:
    assert budget_tokens(80 * GIB, 0.9, 0, 1000, maximum=65536) == 65536
    assert budget_tokens(GIB, 0.9, 2 * GIB, 1000, minimum=512) == 512  # nothing left: the floor
    assert budget_tokens(GIB, 0.9, 0, 0, maximum=4096) == 4096
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="memory fraction"):
            budget_tokens(GIB, bad, 0, 1000)


def test_profile_sizes_double_up_to_the_cap() -> None:
    assert next_sizes(4096, 65536) == [4096, 8192, 16384, 32768, 65536]
    assert next_sizes(4096, 20000) == [4096, 8192, 16384, 20000]
    assert next_sizes(512, 512) == [512]
    with pytest.raises(ValueError):
        next_sizes(0, 10)


def test_cache_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profiles.json"
    key = memory.cache_key("abc123", "NVIDIA H100 80GB HBM3", "bfloat16", "varlen")
    assert memory.load_cached(key, path) is None
    profile = MemoryProfile(((4096, 10_000_000), (8192, 19_000_000)), tokens_per_s=123456.0)
    memory.store_cached(key, profile, path)
    memory.store_cached("other", MemoryProfile(((1, 2),)), path)
    assert memory.load_cached(key, path) == profile
    assert set(json.loads(path.read_text())) == {key, "other"}
    path.write_text("{not json")
    assert memory.load_cached(key, path) is None  # a damaged cache means "profile again"
    memory.store_cached(key, profile, path)
    assert memory.load_cached(key, path) == profile


def test_report_names_budget_memory_and_speed() -> None:
    profile = MemoryProfile(((4096, 4096 * 20_000),), tokens_per_s=750_000)
    line = memory.report(65536, 70 * GIB, 0.8, profile, cached=True)
    assert "65536 tokens" in line and "80% of 70.0 GiB" in line and "750,000 tokens/s" in line
    assert "cached" in line


class _Device:
    """A device whose memory use is a known line: fixed + per_token * tokens (what the profile fits)."""

    name = "test device"

    def __init__(self, free: int, fixed: int, per_token: int) -> None:
        self.free, self.fixed, self.per_token = free, fixed, per_token
        self.used = 0
        self.released = 0

    def free_bytes(self) -> int:
        return self.free

    def reset_peak(self) -> int:
        self.used = 0
        return 0

    def peak_bytes(self) -> int:
        return self.used

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)

    def release(self) -> None:
        self.released += 1


class _Profiled(Backend):
    """A backend on that device: each forward 'allocates' what the line says for its tokens."""

    name = "fake"
    dtype = "bfloat16"

    def __init__(self, device: _Device) -> None:
        self.device_ = device
        self.forwards: list[int] = []

    def memory_device(self) -> _Device:  # type: ignore[override]
        return self.device_

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        tokens = batch.n_real_tokens
        self.forwards.append(tokens)
        self.device_.used = self.device_.fixed + self.device_.per_token * tokens
        return np.zeros((len(batch.lengths), 4), np.float32)


def test_the_engine_sizes_any_backend_through_its_interface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path))
    device = _Device(free=8 * GIB, fixed=GIB // 4, per_token=50_000)
    backend = _Profiled(device)
    first = memory.batch_budget(backend, "rev1", 512, fraction=0.5, in_child=False)
    fixed, per_token = memory.load_cached(memory.cache_key("rev1", "test device", "bfloat16", "default")).line()  # type: ignore[union-attr]
    assert fixed == pytest.approx(GIB // 4, rel=1e-6) and per_token == pytest.approx(50_000, rel=1e-6)
    assert first.tokens == budget_tokens(8 * GIB, 0.5, GIB // 4, 50_000, maximum=memory.MAX_BATCH_TOKENS)
    assert backend.forwards and max(backend.forwards) * 50_000 * memory.SAFETY <= 8 * GIB * 0.5
    assert device.released >= 1  # the profile leaves no cached blocks behind
    profiled = len(backend.forwards)
    again = memory.batch_budget(backend, "rev1", 512, fraction=0.5, in_child=False)
    assert again.tokens == first.tokens and "(cached profile)" in again.report and len(backend.forwards) == profiled
    capped = memory.batch_budget(backend, "rev2", 512, fraction=0.5, cap=3000, in_child=False)
    assert capped.tokens == 3000 and len(backend.forwards) == profiled  # a cap: no profile at all


def test_host_memory_backends_keep_their_preferred_budget() -> None:
    class OnHost(Backend):
        name, preferred_batch_tokens = "host", 2048

    budget = memory.batch_budget(OnHost(), "rev", 512)
    assert budget.tokens == 2048 and "host" in budget.report


def test_the_profile_runs_every_output_a_backend_offers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bge-m3's heads cost memory per token too: the budget is sized with them running."""
    from producer.outputs import DENSE_ONLY
    from worker.backends.base import BatchOutputs

    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path))

    class WithHeads(_Profiled):
        outputs = ("dense", "sparse", "multivector")  # type: ignore[assignment]

        def launch_outputs(self, batch: Batch, outputs: tuple[str, ...], precise: bool = False):  # type: ignore[no-untyped-def]
            assert outputs == self.outputs and outputs != DENSE_ONLY
            self.forward(batch)
            self.device_.used += 30_000 * batch.n_real_tokens  # the heads' share
            return lambda: BatchOutputs(dense=np.zeros((len(batch.lengths), 4), np.float32))

    device = _Device(free=8 * GIB, fixed=GIB // 4, per_token=50_000)
    budget = memory.batch_budget(WithHeads(device), "rev-heads", 512, fraction=0.5, in_child=False)
    assert budget.tokens == budget_tokens(8 * GIB, 0.5, GIB // 4, 80_000, maximum=memory.MAX_BATCH_TOKENS)
