"""The engine's batch budget: a cap the user gives, the backend's own, or sized to device memory.

``batch_budget`` decides it for any backend, through the backend interface: a ``--max-batch-tokens``
cap is taken as it is (no profile runs); a backend on host memory (CPU) keeps the budget it
prefers; a backend on a device with memory of its own (``Backend.memory_device``) is profiled.

Why profile: a fixed token budget is either too small for a large GPU (launch overhead, idle tensor
cores) or too large for a small one (out-of-memory splits on every batch). At start the engine
runs the model at growing token counts, records the peak activation memory of each, fits
``bytes = fixed + per_token * tokens``, and takes the largest budget that stays within
``fraction`` of the free memory. The fitted line (not the budget) is cached per model revision,
device name, dtype and mode, because free memory and the fraction may differ at the next start
while the model's appetite does not. The allocator cache is released afterwards, so the profile
leaves no idle memory behind.

The profile runs in a throwaway child process where the backend can be built again from its
recipe: the kernels, workspaces and allocator segments a profile leaves behind die with it, so
the serving process holds only weights until it serves. Everything except ``profile_device``
is plain arithmetic, tested on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from producer.errors import Unavailable
from producer.outputs import DENSE_ONLY
from producer.settings import cache_dir, settings

if TYPE_CHECKING:
    from worker.backends.base import Backend, MemoryDevice, Recipe

log = logging.getLogger(__name__)

#: more tokens per batch than this buys no speed on any GPU measured, only latency
MAX_BATCH_TOKENS = 65536
#: the first token count profiled
PROFILE_START = 4096

GIB = float(1 << 30)
#: headroom on the fitted per-token cost: fragmentation and kernels' workspaces
SAFETY = 1.15


@dataclass(frozen=True)
class MemoryProfile:
    """Peak activation bytes measured at several token counts, and the speed at the largest."""

    samples: tuple[tuple[int, int], ...]
    tokens_per_s: float = 0.0

    def line(self) -> tuple[float, float]:
        """``(fixed_bytes, bytes_per_token)`` fitted to the samples."""
        return fit_line(self.samples)

    def to_json(self) -> dict:
        return {"samples": [list(s) for s in self.samples], "tokens_per_s": self.tokens_per_s}

    @classmethod
    def from_json(cls, data: dict) -> "MemoryProfile":
        samples = tuple((int(t), int(b)) for t, b in data["samples"])
        if not samples:
            raise ValueError("a memory profile needs at least one sample")
        return cls(samples, float(data.get("tokens_per_s", 0.0)))


def fit_line(samples: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``bytes = fixed + per_token * tokens``; never a negative slope or intercept.

    One sample gives a line through the origin (all cost per token: the cautious reading).
    """
    if not samples:
        raise ValueError("fit_line needs at least one (tokens, bytes) sample")
    if len(samples) == 1 or len({t for t, _ in samples}) == 1:
        tokens, used = samples[-1]
        return 0.0, used / max(tokens, 1)
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    slope = sum((t - mean_t) * (b - mean_b) for t, b in samples) / var
    slope = max(slope, 0.0)
    fixed = mean_b - slope * mean_t
    if fixed < 0:  # a line through the origin and the largest sample is the safe choice
        tokens, used = max(samples)
        return 0.0, max(slope, used / max(tokens, 1))
    return fixed, slope


def budget_tokens(free_bytes: float, fraction: float, fixed_bytes: float, bytes_per_token: float, *,
                  granularity: int = 1024, minimum: int = 512, maximum: int = 65536) -> int:
    """The token budget that keeps a batch's activations within ``fraction`` of ``free_bytes``.

    Rounded down to ``granularity`` (shapes repeat, kernels tune once), clamped to
    ``[minimum, maximum]``: below ``minimum`` the engine still runs (an out-of-memory split
    handles it), above ``maximum`` batches only add latency.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    if bytes_per_token <= 0:
        return maximum
    usable = free_bytes * fraction - fixed_bytes
    tokens = int(usable / (bytes_per_token * SAFETY))
    tokens = (tokens // granularity) * granularity
    return max(minimum, min(maximum, tokens))


def next_sizes(start: int, maximum: int) -> list[int]:
    """Token counts to profile: doubling from ``start`` up to and including ``maximum``."""
    if start < 1 or maximum < start:
        raise ValueError(f"profile sizes need 1 <= start <= maximum, got {start}, {maximum}")
    sizes, size = [], start
    while size < maximum:
        sizes.append(size)
        size *= 2
    sizes.append(maximum)
    return sizes


def cache_key(revision: str, device_name: str, dtype: str, mode: str) -> str:
    return f"{revision}|{device_name}|{dtype}|{mode}"


def cache_path() -> Path:
    return cache_dir("memory-profiles.json")


def load_cached(key: str, path: Path | None = None) -> MemoryProfile | None:
    """The cached profile for ``key``, or ``None`` (a damaged cache is ignored, not fatal)."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        return MemoryProfile.from_json(data[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(key: str, profile: MemoryProfile, path: Path | None = None) -> None:
    """Add ``profile`` under ``key``, atomically (concurrent workers never read half a file)."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = profile.to_json()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profiles-")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a worker
        log.warning("could not cache the memory profile in %s: %s", path, exc)


def heaviest_forward(backend: "Backend", batch: Any) -> None:
    """A forward computing every output the backend offers (bge-m3's sparse and ColBERT heads too):
    the budget must hold the heaviest request a batch can carry, not just dense ones."""
    if tuple(backend.outputs) == DENSE_ONLY:
        backend.forward(batch)
    else:
        backend.launch_outputs(batch, tuple(backend.outputs))()


def profile_device(backend: "Backend", device: "MemoryDevice", usable_bytes: float, sizes: Sequence[int],
                   seq_len: int) -> MemoryProfile:
    """Run ``backend`` at growing token counts and record each one's peak activation memory.

    Stops before a size whose predicted peak passes ``usable_bytes``, or at the first
    out-of-memory. The largest size that ran is timed once more for the start-up report.
    """
    samples: list[tuple[int, int]] = []
    for tokens in sizes:
        if samples:
            fixed, per_token = fit_line(samples)
            if (fixed + per_token * tokens) * SAFETY > usable_bytes:
                break
        base = device.reset_peak()
        try:
            heaviest_forward(backend, backend.synthetic_batch(tokens, seq_len))
        except Exception as exc:
            if not device.is_out_of_memory(exc):
                raise
            device.release()
            break
        samples.append((tokens, device.peak_bytes() - base))
    if not samples:
        raise Unavailable(f"the model does not run even {sizes[0]} tokens within the memory it was given")
    largest = samples[-1][0]
    device.reset_peak()
    start = time.perf_counter()
    backend.forward(backend.synthetic_batch(largest, seq_len))
    device.peak_bytes()  # waits for the device
    speed = largest / (time.perf_counter() - start)
    device.release()
    return MemoryProfile(tuple(samples), speed)


@dataclass(frozen=True)
class Budget:
    """The token budget of one engine's batches and the start-up line that explains it."""

    tokens: int
    report: str


def batch_budget(backend: "Backend", revision: str, max_length: int, fraction: float | None = None,
                 cap: int | None = None, in_child: bool = True) -> Budget:
    """The budget for ``backend``'s batches (see the module docstring for the three cases)."""
    if cap is not None:
        return Budget(cap, f"batch budget {cap} tokens (--max-batch-tokens: no profile)")
    device = backend.memory_device()
    if device is None:
        tokens = backend.preferred_batch_tokens
        return Budget(tokens, f"batch budget {tokens} tokens (the {backend.name} backend's on {backend.device})")
    fraction = settings().memory_fraction if fraction is None else fraction
    free = device.free_bytes()
    key = cache_key(revision, device.name, backend.dtype, backend.mode)
    profile = load_cached(key)
    cached = profile is not None
    if profile is None and in_child and backend.recipe is not None:
        profile = _profile_in_child(backend.recipe, revision, max_length, key, fraction)
    if profile is None:
        sizes = next_sizes(min(PROFILE_START, MAX_BATCH_TOKENS), MAX_BATCH_TOKENS)
        profile = profile_device(backend, device, free * fraction, sizes, max_length)
        store_cached(key, profile)
    fixed, per_token = profile.line()
    tokens = budget_tokens(free, fraction, fixed, per_token, maximum=MAX_BATCH_TOKENS)
    line = report(tokens, free, fraction, profile, cached)
    log.info("%s on %s (%s, %s): %s", revision, device.name, backend.dtype, backend.mode, line)
    device.release()
    return Budget(tokens, line)


def _profile_child(recipe: "Recipe", revision: str, max_length: int, fraction: float) -> None:
    """Entry point of the throwaway profiling process: build the backend again, profile, cache."""
    from worker.backends.select import build

    logging.basicConfig(level=logging.INFO)
    backend = build(recipe)
    batch_budget(backend, revision, max_length, fraction, in_child=False)


def _profile_in_child(recipe: "Recipe", revision: str, max_length: int, key: str,
                      fraction: float) -> MemoryProfile | None:
    """Profile in a spawned process; ``None`` (profile here instead) when that is impossible."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_profile_child, name="ef-memory-profile", daemon=True,
                            args=(recipe, revision, max_length, fraction))
    try:
        child.start()
        child.join(900)
    except Exception as exc:  # e.g. no way to spawn here: profile in this process instead
        log.warning("memory profile in a child process failed to run (%s); profiling here", exc)
        return None
    if child.is_alive():
        child.kill()
    profile = load_cached(key)
    if profile is None:
        log.warning("memory profile in a child process gave nothing (exit code %s); profiling here", child.exitcode)
    return profile


def report(budget: int, free_bytes: float, fraction: float, profile: MemoryProfile, cached: bool) -> str:
    """The start-up line: chosen budget, the memory it is based on, the measured speed."""
    fixed, per_token = profile.line()
    return (
        f"batch budget {budget} tokens: {fraction:.0%} of {free_bytes / GIB:.1f} GiB free, "
        f"{per_token / 1024:.1f} KiB/token + {fixed / GIB:.2f} GiB fixed; "
        f"{profile.tokens_per_s:,.0f} tokens/s at {profile.samples[-1][0]} tokens"
        + (" (cached profile)" if cached else "")
    )
