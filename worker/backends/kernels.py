"""Fused GPU kernels for the unpadded encoder and decoder, with plain-torch equivalents for everywhere else.

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

The Qwen3 decoder (``worker.backends.decoder``) has three more, each one pass where transformers'
layer takes several: ``fused_add_rms_norm`` (residual add + RMSNorm), ``fused_qk_norm_rope`` (the
per-head q/k RMSNorm and RoPE from the fused QKV output) and ``fused_silu_mul`` (SwiGLU's
``silu(gate) * up``). Statistics and products are in fp32, rounded where transformers rounds.

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


# ---------------------------------------------------------------------------- the decoder's (Qwen3) passes
@functools.lru_cache(maxsize=1)
def _decoder_kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm(X, DELTA, W, OUT, stride_x, stride_d, N, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded and stored as transformers' stream is
            d = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + d).to(X.dtype.element_ty)
            tl.store(X + row * stride_x + cols, s, mask=mask)
            x = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        n = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * N + cols, (n * w).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def qk_norm_rope(QKV, QW, KW, POS, FREQ, Q, K, stride_qkv, H, KV, eps, HALF: tl.constexpr,
                     BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, HALF)
        dim = 2 * HALF
        valid = (heads < H + KV)[:, None]
        is_q = (heads < H)[:, None]
        src = QKV + t * stride_qkv + heads[:, None] * dim + cols[None, :]
        x1 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=valid, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / dim + eps)
        w1 = tl.where(is_q, tl.load(QW + cols).to(tl.float32)[None, :], tl.load(KW + cols).to(tl.float32)[None, :])
        w2 = tl.where(is_q, tl.load(QW + HALF + cols).to(tl.float32)[None, :],
                      tl.load(KW + HALF + cols).to(tl.float32)[None, :])
        n1 = ((x1 * rstd[:, None]).to(Q.dtype.element_ty).to(tl.float32) * w1).to(Q.dtype.element_ty).to(tl.float32)
        n2 = ((x2 * rstd[:, None]).to(Q.dtype.element_ty).to(tl.float32) * w2).to(Q.dtype.element_ty).to(tl.float32)
        angle = tl.load(POS + t).to(tl.float32) * tl.load(FREQ + cols)
        c = tl.cos(angle)[None, :]
        s = tl.sin(angle)[None, :]
        o1 = (n1 * c - n2 * s).to(Q.dtype.element_ty)
        o2 = (n2 * c + n1 * s).to(Q.dtype.element_ty)
        q_dst = Q + t * H * dim + heads[:, None] * dim + cols[None, :]
        tl.store(q_dst, o1, mask=is_q)
        tl.store(q_dst + HALF, o2, mask=is_q)
        k_mask = valid & (heads >= H)[:, None]
        k_dst = K + t * KV * dim + (heads - H)[:, None] * dim + cols[None, :]
        tl.store(k_dst, o1, mask=k_mask)
        tl.store(k_dst + HALF, o2, mask=k_mask)

    @triton.jit
    def silu_mul(GU, OUT, stride_gu, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * N + cols, (g / (1.0 + tl.exp(-g)) * u).to(OUT.dtype.element_ty), mask=mask)

    return add_rms_norm, qk_norm_rope, silu_mul


def fused_add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``x += delta`` in place (when given), then RMSNorm of ``x`` scaled by ``weight``: one read of
    each input and one write of each output (Triton), instead of an add and four norm passes."""
    import triton

    rows, n = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _decoder_kernels()[0][(rows,)](x, x if delta is None else delta, weight, out, x.stride(0),
                                   x.stride(0) if delta is None else delta.stride(0), n, eps,
                                   HAS_DELTA=delta is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out


def fused_qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, positions: torch.Tensor,
                       inv_freq: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE at each token's position, from the fused QKV GEMM's
    output ``[total, (heads + 2 * kv_heads) * head_dim]`` in one pass: ``q [total, heads, dim]``,
    ``k [total, kv_heads, dim]`` (contiguous); v stays a view of ``qkv``."""
    import triton

    total = qkv.shape[0]
    q = torch.empty(total, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(total, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _decoder_kernels()[1][(total,)](qkv, q_weight, k_weight, positions, inv_freq, q, k, qkv.stride(0), heads,
                                    kv_heads, eps, HALF=head_dim // 2,
                                    BLOCK_H=triton.next_power_of_2(heads + kv_heads), num_warps=4)
    return q, k


def fused_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused gate/up GEMM's ``[total, 2 * intermediate]`` in one pass."""
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _decoder_kernels()[2][(rows, (n + block - 1) // block)](gate_up, out, gate_up.stride(0), n, BLOCK=block,
                                                            num_warps=4)
    return out
