"""Unpadded ("varlen") Qwen3 decoder embedder over packed tokens, built from the HF weights.

Why: decoder embedders (Qwen3-Embedding, last-token pooling) on the generic path run padded
batches through transformers' ``Qwen3Model``: GEMM and attention work on padding, a causal mask
materialized per batch, and a dozen small kernels per layer around each GEMM. Here every real
token of a batch is packed into one ``[total, hidden]`` matrix, sequences delimited by
``cu_seqlens`` as for the BERT path (``worker.backends.varlen``), and each layer is

    RMSNorm -> fused QKV GEMM -> per-head RMSNorm of q and k -> RoPE at each token's position in
    its own sequence -> causal attention within each sequence (GQA: 8 key/value heads serve 16
    query heads) -> output GEMM + residual -> RMSNorm -> fused gate/up GEMM -> SiLU * up ->
    down GEMM + residual

followed by the final RMSNorm. No token is ever padded.

Attention: on CUDA in fp16/bf16, flash attention's varlen kernel with ``is_causal`` (it takes
fewer key/value heads than query heads natively); anywhere else (CPU, fp32) the packed tokens
are scattered into a padded tensor for SDPA with a causal-and-key mask. The module is plain
torch, so CI checks it against transformers' ``Qwen3Model`` on CPU.

What it does not implement it refuses (``unsupported_reason``), and the backend keeps the generic
path for it: sliding-window layers, RoPE scalings other than the default, activations other than
SiLU, and any other decoder family.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from worker.backends.varlen import flash_available

log = logging.getLogger(__name__)

#: decoder model types whose layout this module reproduces exactly
MODEL_TYPES = {"qwen3"}


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run through this decoder (``None`` when it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {sorted(MODEL_TYPES)}"
    if not all(hasattr(model, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model is not a bare decoder (AutoModel: embed_tokens, layers, norm, rotary_emb)"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act!r} is not SiLU"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not implemented (use_sliding_window is set)"
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"layer types {other} are not implemented (full attention only)"
    rope_type = getattr(model.rotary_emb, "rope_type", "default")
    if rope_type != "default":
        return f"RoPE type {rope_type!r} is not implemented (default only)"
    if getattr(model.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return "a RoPE attention scaling other than 1.0 is not implemented"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: statistics in fp32, scaled by the weight (torch's fused kernel on CUDA)."""
    weight = weight.to(x.dtype)  # a no-op but under the fp16 -> bf16 recompute (autocast)
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[total, heads, dim]`` with ``cos``/``sin`` ``[total, 1, dim]`` (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _public_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                   scale: float) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``, asked for causal attention as its signature says."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)} if "window_size" in params \
        else None
    if causal is None:
        raise TypeError("varlen_attn takes neither is_causal nor window_size")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)


def _aten_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                scale: float) -> torch.Tensor:
    """The aten flash op (``cu_seqlens`` since torch 2.1), causal."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                   scale=scale)[0]


def _aten_flash_repeated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                         scale: float) -> torch.Tensor:
    """The aten flash op with the key/value heads repeated (a build whose kernel refuses GQA)."""
    groups = q.shape[1] // k.shape[1]
    return _aten_flash(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), cu, max_len, scale)


#: causal varlen kernels in order of preference; the first that runs on this device is kept
CAUSAL_KERNELS: tuple[Callable[..., torch.Tensor], ...] = (_public_varlen, _aten_flash, _aten_flash_repeated)
_chosen: list[Callable[..., torch.Tensor]] = []


def flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence ``[total, heads, dim]`` with torch's flash
    kernel; ``k``/``v`` have ``kv_heads`` heads, each serving ``heads / kv_heads`` query heads."""
    if _chosen:
        return _chosen[0](q, k, v, cu, max_len, scale)
    errors = []
    for kernel in CAUSAL_KERNELS:  # the first batch finds what this torch build offers
        try:
            out = kernel(q, k, v, cu, max_len, scale)
        except torch.OutOfMemoryError:
            raise  # the engine splits the batch; not a reason to pick another kernel
        except (ImportError, TypeError, RuntimeError, NotImplementedError) as exc:
            errors.append(f"{kernel.__name__}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        _chosen.append(kernel)
        log.info("causal varlen attention: %s%s", kernel.__name__, f" (not: {'; '.join(errors)})" if errors else "")
        return out
    raise RuntimeError(f"no causal varlen attention kernel runs here: {'; '.join(errors)}")


class CausalPaddedIndex:
    """Packed tokens scattered into ``[n, longest]`` for SDPA with a causal-and-key mask (CPU, fp32)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int) -> None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.n = int(lengths.numel())
        self.max_len = max_len
        total = int(cu_seqlens[-1])
        device = cu_seqlens.device
        row = torch.repeat_interleave(torch.arange(self.n, device=device), lengths, output_size=total)
        col = torch.arange(total, device=device) - cu_seqlens[:-1].long()[row]
        self.flat = row * max_len + col
        positions = torch.arange(max_len, device=device)
        keys = positions[None, :] < lengths[:, None]  # [n, L]
        causal = positions[None, :] <= positions[:, None]  # [L, L]: query i sees keys j <= i
        self.mask = (causal[None] & keys[:, None, :])[:, None]  # [n, 1, L, L]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(self.n * self.max_len, x.shape[1], x.shape[2])
            out.index_copy_(0, self.flat, x)
            return out.view(self.n, self.max_len, x.shape[1], x.shape[2]).transpose(1, 2)

        groups = q.shape[1] // k.shape[1]
        keys, values = pad(k), pad(v)
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(pad(q), keys, values, attn_mask=self.mask, scale=scale)
        return out.transpose(1, 2).reshape(self.n * self.max_len, q.shape[1], q.shape[2]).index_select(0, self.flat)


class DecoderLayer(nn.Module):
    """One pre-RMSNorm Qwen3 decoder layer over packed tokens (weights taken from the HF layer).

    ``forward`` takes the residual stream ``x`` and its first norm ``h`` and returns the stream
    after attention and the MLP's output: the caller adds that and norms it for the next layer
    in one step (``Passes.add_norm``), so each residual add lands in the norm that follows it.
    """

    def __init__(self, hf_layer: Any, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.out = attn.o_proj
        self.down = mlp.down_proj
        self.q_norm = attn.q_norm.weight
        self.k_norm = attn.k_norm.weight
        self.norm1 = hf_layer.input_layernorm.weight
        self.norm2 = hf_layer.post_attention_layernorm.weight
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps

    def forward(self, x: torch.Tensor, h: torch.Tensor, ops: "Passes",
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self.qkv(h)
        q, k = ops.qk_norm_rope(qkv, self)
        v = qkv[:, q_size + kv_size:].view(total, self.kv_heads, self.head_dim)
        x, h = ops.add_norm(x, self.out(attend(q, k, v).reshape(total, q_size)), self.norm2)
        return x, self.down(ops.silu_mul(self.gate_up(h)))


class Passes:
    """The memory-bound passes between the GEMMs, for one batch: fused Triton kernels
    (``worker.backends.kernels``) on CUDA in half precision, plain torch elsewhere (CPU, fp32,
    autocast), with the RoPE angles at each token's position in its own sequence."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, eps: float,
                 fused: bool) -> None:
        self.eps = eps
        self.fused = fused
        self.dtype = dtype
        self.positions = positions
        self.inv_freq = inv_freq.to(positions.device)
        if not fused:  # cos, sin [total, 1, head_dim], fp32 then cast, as transformers computes them
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
            self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + delta`` (the new residual stream; in place when fused) and its RMSNorm."""
        if self.fused:
            from worker.backends.kernels import fused_add_rms_norm

            return x, fused_add_rms_norm(x, delta, weight, self.eps)
        if delta is not None:
            x = x + delta
        return x, _rms_norm(x, weight, self.eps)

    def qk_norm_rope(self, qkv: torch.Tensor, layer: DecoderLayer) -> tuple[torch.Tensor, torch.Tensor]:
        total, heads, kv_heads, dim = qkv.shape[0], layer.heads, layer.kv_heads, layer.head_dim
        if self.fused:
            from worker.backends.kernels import fused_qk_norm_rope

            return fused_qk_norm_rope(qkv, layer.q_norm, layer.k_norm, self.positions, self.inv_freq, heads,
                                      kv_heads, dim, self.eps)
        q = qkv[:, : heads * dim].view(total, heads, dim)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(total, kv_heads, dim)
        q = _rotate(_rms_norm(q, layer.q_norm, self.eps), self.cos, self.sin)
        k = _rotate(_rms_norm(k, layer.k_norm, self.eps), self.cos, self.sin)
        # in the compute dtype: under autocast (the fp16 -> bf16 recompute) a norm may come back in
        # fp32, and the attention kernels take one half-precision dtype for q, k and v
        return q.to(self.dtype), k.to(self.dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from worker.backends.kernels import fused_silu_mul

            return fused_silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the concatenation of ``linears``' outputs; the separate
    weights are dropped at once, so no weight lives twice."""
    fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                      bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight.data for m in linears]), requires_grad=False)
    if linears[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False)
    for module in linears:
        module.weight = None
        module.bias = None
    return fused


class DecoderEncoder(nn.Module):
    """The HF Qwen3 decoder's weights run over packed tokens; ``forward`` returns the final
    RMSNorm's output ``[total, hidden]`` (what ``Qwen3Model.last_hidden_state`` holds)."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason:
            raise ValueError(f"cannot run this decoder unpadded: {reason}")
        config = hf_model.config
        self.config = config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.embed_tokens = hf_model.embed_tokens
        self.layers = nn.ModuleList(DecoderLayer(layer, self.heads, self.kv_heads, self.head_dim, self.eps)
                                    for layer in hf_model.layers)
        self.norm = hf_model.norm.weight
        self.register_buffer("inv_freq", hf_model.rotary_emb.inv_freq.detach().float().clone(), persistent=False)
        self.use_flash = True
        self.fused = False  # set_fusion: the Triton passes (CUDA)
        self.dense_groups = False  # the BERT path's equal-length dense attention is not used here

    def attention(self, cu_seqlens: torch.Tensor, max_len: int, dtype: torch.dtype
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Flash varlen (causal) on the GPU in half precision; padded SDPA with a causal mask elsewhere."""
        if self.use_flash and flash_available(cu_seqlens.device, dtype):
            return lambda q, k, v: flash_causal(q, k, v, cu_seqlens, max_len, self.scale)
        index = CausalPaddedIndex(cu_seqlens, max_len)
        return lambda q, k, v: index.attend(q, k, v, self.scale)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, positions: torch.Tensor,
                cu_seqlens: torch.Tensor, max_len: int, groups: Any = None) -> torch.Tensor:
        """Same arguments as ``VarlenEncoder.forward`` (token types and groups unused: a decoder has none)."""
        x = self.embed_tokens(input_ids.long())
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        fused = bool(self.fused and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not autocast)
        if fused:
            from worker.backends.kernels import triton_available

            fused = triton_available()
        ops = Passes(positions, self.inv_freq, dtype, self.eps, fused)
        attend = self.attention(cu_seqlens, max_len, dtype)
        norms = [layer.norm1 for layer in self.layers[1:]] + [self.norm]
        x, h = ops.add_norm(x, None, self.layers[0].norm1)
        for layer, norm in zip(self.layers, norms):
            x, delta = layer(x, h, ops, attend)
            x, h = ops.add_norm(x, delta, norm)
        return h

    def set_fusion(self, fused: bool, approximate_gelu: bool = False) -> None:
        """Use the fused kernels of ``worker.backends.kernels`` (CUDA, half precision; plain torch
        elsewhere). ``approximate_gelu`` does not apply: the MLP is SiLU-gated."""
        self.fused = fused


def build_decoder(hf_model: Any) -> DecoderEncoder:
    """A varlen decoder that takes over ``hf_model``'s weights (the HF model is unusable after)."""
    encoder = DecoderEncoder(hf_model).eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder
