"""The decoder's fused Triton passes (``worker.backends.kernels``) against the plain-torch passes
they replace (``worker.backends.decoder.Passes``), in Triton's interpreter on the CPU (skipped
where Triton is not installed; CI's CPU image has none). On a GPU, tests/backends/test_gpu_families.py
checks the compiled kernels inside the whole decoder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import torch
from worker.backends.decoder import Passes
from worker.backends import kernels

gen = torch.Generator().manual_seed(0)
total, heads, kv, dim, eps = 37, 4, 2, 16, 1e-6
positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in (20, 1, 16)])
inv_freq = 1.0 / (1e6 ** (torch.arange(0, dim, 2).float() / dim))
plain = Passes(positions, inv_freq, torch.float32, eps, fused=False)


class Layer:
    pass


layer = Layer()
layer.heads, layer.kv_heads, layer.head_dim = heads, kv, dim
layer.q_norm = torch.rand(dim, generator=gen) + 0.5
layer.k_norm = torch.rand(dim, generator=gen) + 0.5
qkv = torch.randn(total, (heads + 2 * kv) * dim, generator=gen) * 3
want_q, want_k = plain.qk_norm_rope(qkv, layer)
got_q, got_k = kernels.fused_qk_norm_rope(qkv, layer.q_norm, layer.k_norm, positions, inv_freq, heads, kv, dim, eps)
torch.testing.assert_close(got_q, want_q, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(got_k, want_k, atol=1e-4, rtol=1e-4)

x = torch.randn(total, 96, generator=gen)
delta = torch.randn(total, 96, generator=gen)
weight = torch.rand(96, generator=gen) + 0.5
want_x, want_h = plain.add_norm(x.clone(), delta, weight)
got_x = x.clone()
got_h = kernels.fused_add_rms_norm(got_x, delta, weight, eps)
torch.testing.assert_close(got_x, want_x)
torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(kernels.fused_add_rms_norm(x.clone(), None, weight, eps), plain.add_norm(x, None, weight)[1],
                           atol=1e-5, rtol=1e-5)

gate_up = torch.randn(total, 2 * 1100, generator=gen)
torch.testing.assert_close(kernels.fused_silu_mul(gate_up), plain.silu_mul(gate_up), atol=1e-5, rtol=1e-5)
print("ok")
'''


def test_fused_passes_equal_the_plain_passes_in_the_interpreter() -> None:
    """q/k RMSNorm + RoPE (GQA heads, positions restarting per sequence), residual add + RMSNorm
    (in place), and SiLU-mul over a width that is not a multiple of the block."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
