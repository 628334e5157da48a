"""The memory profiler's arithmetic: line fit, budget, profile sizes, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
