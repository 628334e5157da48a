"""CPU-specific tuning of the torch backend (threads, bf16 on AVX-512-BF16/AMX, torch.compile).

Kept apart from ``torch.py`` so CPU work and GPU work evolve separately.

What pays on CPU (measured by ``bench/cpu.py``): bf16 weights where the CPU has bf16 dot
products (AVX-512-BF16 or AMX): oneDNN then runs the linear layers at about twice the fp32
rate, with cosine to fp32 around 0.9999. Without those units bf16 is emulated and slower than
fp32, so the auto selection only proposes it where :func:`bf16_native` is true, and an
explicit ``--dtype bfloat16`` there still runs (the dtype asked for is the dtype used) with a
warning. ``torch.compile`` (inductor, weights frozen and prepacked for oneDNN) adds roughly a
fifth more on top, but costs tens of seconds of compilation at start, so it is opt-in: the
setting ``EMBEDFLEET_TORCH_COMPILE``.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

from producer.settings import Settings, settings
from worker.backends.base import cpu_threads

log = logging.getLogger(__name__)

COMPILE_ENV = Settings.env_name("torch_compile")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_native() -> bool:
    """Whether bf16 matmuls run on hardware here (AVX-512-BF16 or AMX), not emulated."""
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(supported()) if supported is not None else False
    except RuntimeError:  # pragma: no cover - mkldnn missing from this build
        return False


def fp16_native() -> bool:
    """Whether fp16 matmuls run on hardware here (AVX-512-FP16 or AMX-FP16)."""
    return bool({"avx512_fp16", "amx_fp16"} & cpu_flags())


def describe_cpu() -> str:
    """One line for logs and benchmark results: ISA torch uses, and the bf16/AMX units present."""
    flags = cpu_flags()
    units = [name for name in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx512_fp16") if name in flags]
    return f"torch ISA {torch.backends.cpu.get_cpu_capability()}, units: {', '.join(units) or 'none of bf16/AMX/VNNI'}"


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``forward`` with inductor (dynamic shapes, frozen and prepacked weights).

    The bound ``forward`` is replaced rather than the module wrapped, so callers that inspect
    its signature (``token_type_ids`` for pairs) still see the real one.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.cpp.weight_prepack = True
    model.forward = torch.compile(model.forward, dynamic=True)  # type: ignore[method-assign]
    return model


def optimize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Return the model prepared for CPU inference in ``dtype``."""
    threads = cpu_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dtype == torch.bfloat16 and not bf16_native():
        log.warning("bfloat16 on this CPU is emulated (no AVX-512-BF16/AMX): expect it slower than float32")
    if dtype == torch.float16 and not fp16_native():
        log.warning("float16 on this CPU is emulated (no AVX-512-FP16/AMX-FP16): expect it much slower than float32")
    log.info("torch CPU: %s, %d threads, %s", describe_cpu(), threads, dtype)
    if settings().torch_compile:
        log.info("compiling the model with torch.compile (inductor); the first batches take longer")
        model = _compile(model)
    return model
