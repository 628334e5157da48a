"""Fused GPU kernels for the unpadded encoder, with plain-torch equivalents for everywhere else.

Why: after the GEMMs, a BERT layer's time goes to memory-bound passes over ``[tokens, hidden]``
and ``[tokens, 4 * hidden]``. Two fusions remove whole passes:

* ``bias_residual_layernorm``: ``LayerNorm(x + bias + residual)`` in one read of each input and
  one write (Triton), instead of an add kernel and a LayerNorm kernel (the GEMM before it runs
  without its bias epilogue, which costs nothing).
* ``linear_gelu``: the FFN's first GEMM with bias and GELU in cuBLASLt's epilogue
  (``torch._addmm_activation``), which skips writing and re-reading ``[tokens, 4 * hidden]``.
  cuBLASLt's GELU is the tanh approximation, so this is used only when the model's own
  activation is (``gelu_new``/``gelu_pytorch_tanh``) or when the caller accepts the
  approximation (``approximate_gelu``); bench/gpu.py measures the cosine it costs.

Triton is imported lazily, and only on CUDA: CPU workers never need it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _ln_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def bias_residual_ln(Y, X, R, B, W, LB, stride_x, stride_r, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        h = x + r + b
        mean = tl.sum(h, axis=0) / N
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        lb = tl.load(LB + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (d * rstd * w + lb).to(Y.dtype.element_ty), mask=mask)

    return bias_residual_ln


def bias_residual_layernorm(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            ln_bias: torch.Tensor, eps: float, fused: bool = True) -> torch.Tensor:
    """``layer_norm(x + bias + residual)`` over the last dimension of 2-D ``x`` (written into ``x``)."""
    if not (fused and x.is_cuda and triton_available() and x.dim() == 2 and x.stride(-1) == 1
            and residual.stride(-1) == 1 and not torch.is_autocast_enabled("cuda")):
        h = x + bias + residual
        return F.layer_norm(h, (h.shape[-1],), weight, ln_bias, eps)
    rows, n = x.shape
    import triton

    block = triton.next_power_of_2(n)
    _ln_kernel()[(rows,)](x, x, residual, bias, weight, ln_bias, x.stride(0), residual.stride(0), x.stride(0), n,
                          eps, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return x


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str,
                approximate_gelu: bool) -> torch.Tensor | None:
    """The GEMM with a GELU epilogue where it applies; ``None`` means "do it the plain way"."""
    tanh = activation in ("gelu_new", "gelu_pytorch_tanh")
    if not x.is_cuda or not (tanh or (activation == "gelu" and approximate_gelu)):
        return None
    if torch.is_autocast_enabled("cuda") or x.dtype != weight.dtype:
        return None
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
