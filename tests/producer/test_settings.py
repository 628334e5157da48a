"""The settings module: every EMBEDFLEET_* variable declared once, typed, and the only reader of the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer.errors import SettingsError
from producer.settings import (PREFIX, Settings, cache_dir, described, flag, hf_offline, omp_threads, settings,
                               use_switch_interval)

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "producer").rglob("*.py")) + sorted((REPO / "worker").rglob("*.py"))


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = [str(p.relative_to(REPO)) for p in SOURCES if "os.environ" in p.read_text() or "getenv(" in p.read_text()]
    assert readers == ["producer/settings.py"]


def test_every_variable_the_code_names_is_a_declared_setting() -> None:
    fields = {Settings.env_name(name) for name in Settings.model_fields} | {PREFIX + "CACHE_DIR"}
    named = {m for p in SOURCES for m in re.findall(r"EMBEDFLEET_[A-Z0-9_]+", p.read_text()) if not m.endswith("_")}
    assert named - fields == set(), "variables named in the code but not declared in producer.settings"


def test_defaults_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(Settings.env_name(name), raising=False)
    current = settings()
    assert current.visibility_timeout == 3600 and current.max_deliveries == 3 and current.sqs_wait == 10
    assert current.backend == "auto" and current.memory_fraction == 0.8 and current.sqs_create_queues is True
    assert current.cache == Path.home() / ".cache" / "embedfleet"
    rows = {row["variable"]: row for row in described()}
    assert rows["EMBEDFLEET_VISIBILITY_TIMEOUT"]["default"] == 3600 and rows["EMBEDFLEET_VISIBILITY_TIMEOUT"]["meaning"]
    assert all(row["meaning"] for row in rows.values()), "every setting says what it means"


def test_the_environment_is_read_again_when_it_changes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDFLEET_MAX_DELIVERIES", "7")
    assert settings().max_deliveries == 7
    monkeypatch.setenv("EMBEDFLEET_MAX_DELIVERIES", "2")
    assert settings().max_deliveries == 2
    monkeypatch.delenv("EMBEDFLEET_CACHE", raising=False)
    monkeypatch.setenv("EMBEDFLEET_CACHE_DIR", str(tmp_path / "old-name"))
    assert cache_dir("onnx") == tmp_path / "old-name" / "onnx"  # the old variable is the same root
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path / "new"))
    assert cache_dir() == tmp_path / "new"


@pytest.mark.parametrize("name, value, words", [
    ("EMBEDFLEET_VISIBILITY_TIMEOUT", "soon", "valid integer"),
    ("EMBEDFLEET_VISIBILITY_TIMEOUT", "0", "greater than or equal to 1"),
    ("EMBEDFLEET_SQS_WAIT", "30", "less than or equal to 20"),
    ("EMBEDFLEET_MEMORY_FRACTION", "1.5", "less than or equal to 1"),
    ("EMBEDFLEET_SQS_CREATE_QUEUES", "maybe", "boolean"),
])
def test_a_bad_value_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                     words: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        settings()
    assert f"{name}={value!r}" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False),
                                           ("false", False), ("no", False), ("off", False), ("", False), (None, False)])
def test_one_boolean_parser(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: bool) -> None:
    assert flag(raw) is expected
    if raw is not None:
        monkeypatch.setenv("EMBEDFLEET_SQS_CREATE_QUEUES", raw or "1")
        assert settings().sqs_create_queues is (expected if raw else True)
        monkeypatch.setenv("HF_HUB_OFFLINE", raw)
        assert hf_offline() is expected
    with pytest.raises(SettingsError, match="HF_HUB_OFFLINE='perhaps'"):
        flag("perhaps", "HF_HUB_OFFLINE")


def test_other_variables_are_read_through_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert omp_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert omp_threads() is None


def test_the_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [Settings.env_name(name) for name in Settings.model_fields if Settings.env_name(name) not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_switch_interval_is_applied_when_set_and_a_bad_value_is_left_to_the_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    before = sys.getswitchinterval()
    try:
        monkeypatch.setenv("EMBEDFLEET_SWITCH_INTERVAL", "0.002")
        use_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.002)
        monkeypatch.setenv("EMBEDFLEET_SWITCH_INTERVAL", "-1")  # out of range: no change, no traceback here
        use_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.002)
        with pytest.raises(SettingsError, match="SWITCH_INTERVAL"):
            settings()
    finally:
        sys.setswitchinterval(before)


#: A process that fills 30 short-text requests' output arrays (2,000 x 384 float32, 3 MB each), frees
#: them, and counts the page faults of doing it again: what an engine's post-processing thread does.
_REFILL = """
import resource
import numpy as np
from producer.settings import keep_freed_memory
applied = keep_freed_memory()
def fill():
    arrays = [np.zeros((2000, 384), np.float32) for _ in range(30)]
    for a in arrays:
        a[:] = 1.0
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_output_arrays_are_reused_warm_when_memory_is_kept() -> None:
    import os
    import subprocess
    import sys

    pages = 30 * 2000 * 384 * 4 // 4096

    def refill(keep: str) -> tuple[str, int]:
        env = {**os.environ, "EMBEDFLEET_MALLOC_KEEP_MB": keep, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", _REFILL], env=env, capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, faults = refill("256")
    assert applied == "True" and faults < pages // 10, f"{faults} page faults for {pages} pages kept"
    applied, faults = refill("0")  # glibc's defaults: the freed heap is trimmed, the pages faulted in again
    assert applied == "False" and faults > pages // 2, f"only {faults} faults for {pages} pages: nothing to keep?"


def test_cuda_wait_takes_spin_or_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDFLEET_CUDA_WAIT", raising=False)
    assert settings().cuda_wait == "spin"
    monkeypatch.setenv("EMBEDFLEET_CUDA_WAIT", "block")
    assert settings().cuda_wait == "block"
    monkeypatch.setenv("EMBEDFLEET_CUDA_WAIT", "sleep")
    with pytest.raises(SettingsError, match="CUDA_WAIT"):
        settings()
