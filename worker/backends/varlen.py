"""Unpadded ("varlen") BERT / XLM-R encoder over packed tokens, built from the HF weights.

Why: a padded batch ``[n, longest]`` spends GEMM and attention work on padding. Here every real
token of a batch is packed into one ``[total, hidden]`` matrix, the sequences are delimited by
``cu_seqlens`` (cumulative lengths, as flash-attention takes them), and each layer is
fused QKV GEMM -> attention within each sequence -> output GEMM + residual + LayerNorm ->
FFN GEMM + GELU -> GEMM + residual + LayerNorm. No token is ever padded. (A torch.compile'd
variant of the layers was measured slower than the fused eager path on an H100 and removed.)

Attention picks the fastest kernel the device has: on CUDA in fp16/bf16, torch's varlen flash
attention (``torch.nn.attention.varlen.varlen_attn``, else ``aten._flash_attention_forward``
with ``cu_seqlens``); anywhere else (CPU, fp32) it scatters into a padded tensor for SDPA with
a key mask. The module is plain torch, so CI checks it against transformers on CPU.

The encoder takes its weights from the HF model and *moves* them (Q, K and V are concatenated
once, the separate copies dropped), so no weight exists twice in memory.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: model types whose encoder layout this module reproduces exactly
SUPPORTED_MODEL_TYPES = {"bert", "roberta", "xlm-roberta"}
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run unpadded (``None`` when it can): the caller keeps the HF path."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position embedding type {config.position_embedding_type!r} is not absolute"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "decoder models are not supported"
    if config.hidden_act not in _ACTIVATIONS:
        return f"activation {config.hidden_act!r} is not supported"
    if not hasattr(model, "embeddings") or not hasattr(model, "encoder"):
        return "the model is not a bare encoder (AutoModel) with embeddings and encoder"
    return None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen flash kernel can run for this device and dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                  scale: float) -> torch.Tensor:
    """``[total, heads, dim]`` attention within each sequence, with torch's flash kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch: the aten op has taken cu_seqlens since 2.1
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False, False,
                                                     scale=scale)
        return out[0]
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)


#: dense SDPA kernels tried in this order for equal-length runs (cuDNN's fused attention is the
#: fastest on Hopper where it applies; flash is the fallback)
DENSE_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def equal_length_groups(lengths: Any, max_groups: int = 8) -> list[tuple[int, int, int]] | None:
    """Runs of consecutive equal lengths as ``(first token, count, length)``; ``None`` if too many.

    The scheduler sorts a batch by length, so a batch of near-uniform texts (the seed workload:
    ~450 tokens each) is one or two runs, and dense attention needs neither mask nor padding.
    """
    groups: list[tuple[int, int, int]] = []
    start = 0
    for length in (int(x) for x in lengths):
        if groups and groups[-1][2] == length:
            first, count, _ = groups[-1]
            groups[-1] = (first, count + 1, length)
        else:
            if len(groups) == max_groups:
                return None
            groups.append((start, 1, length))
        start += length
    return groups


def _dense_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[tuple[int, int, int]],
                  scale: float) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    backends = [getattr(SDPBackend, name) for name in DENSE_BACKENDS]
    with sdpa_kernel(backends, set_priority=True):
        for first, count, length in groups:
            end = first + count * length

            def view(x: torch.Tensor) -> torch.Tensor:
                return x[first:end].view(count, length, heads, dim).transpose(1, 2)

            result = F.scaled_dot_product_attention(view(q), view(k), view(v), scale=scale)
            out[first:end].view(count, length, heads, dim).copy_(result.transpose(1, 2))
    return out


class PaddedIndex:
    """Where each packed token sits in a padded ``[n, longest]`` layout (for the SDPA fallback)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int) -> None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.n = int(lengths.numel())
        self.max_len = max_len
        total = int(cu_seqlens[-1])
        row = torch.repeat_interleave(torch.arange(self.n, device=cu_seqlens.device), lengths, output_size=total)
        col = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[row]
        self.flat = row * max_len + col
        positions = torch.arange(max_len, device=cu_seqlens.device)
        self.key_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]  # [n, 1, 1, L]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(self.n * self.max_len, heads, dim)
            out.index_copy_(0, self.flat, x)
            return out.view(self.n, self.max_len, heads, dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=self.key_mask, scale=scale)
        return out.transpose(1, 2).reshape(self.n * self.max_len, heads, dim).index_select(0, self.flat)


class VarlenLayer(nn.Module):
    """One post-LayerNorm transformer encoder layer (BERT / RoBERTa / XLM-R) over packed tokens."""

    def __init__(self, hf_layer: Any, heads: int, eps: float, activation: str) -> None:
        super().__init__()
        attn = hf_layer.attention
        qkv = [attn.self.query, attn.self.key, attn.self.value]
        self.qkv = nn.Linear(qkv[0].in_features, 3 * qkv[0].out_features, device="meta")
        self.qkv.weight = nn.Parameter(torch.cat([m.weight.data for m in qkv]), requires_grad=False)
        self.qkv.bias = nn.Parameter(torch.cat([m.bias.data for m in qkv]), requires_grad=False)
        for module in qkv:  # drop the separate copies now: no weight lives twice
            module.weight = None
            module.bias = None
        self.out = attn.output.dense
        self.ln1 = attn.output.LayerNorm
        self.ffn_in = hf_layer.intermediate.dense
        self.ffn_out = hf_layer.output.dense
        self.ln2 = hf_layer.output.LayerNorm
        self.heads = heads
        self.eps = eps
        self.activation = activation
        self.act = _ACTIVATIONS[activation]
        self.fused = False  # Triton bias+residual+LayerNorm (CUDA); see worker.backends.kernels
        self.approximate_gelu = False  # cuBLASLt GELU epilogue (tanh) for exact-GELU models

    def forward(self, x: torch.Tensor, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        total, hidden = x.shape
        qkv = self.qkv(x).view(total, 3, self.heads, hidden // self.heads)
        q, k, v = qkv.unbind(1)
        context = attend(q, k, v).reshape(total, hidden)
        if self.fused:
            return self._fused_tail(x, context)
        x = F.layer_norm(x + self.out(context), (hidden,), self.ln1.weight, self.ln1.bias, self.eps)
        h = self.act(self.ffn_in(x))
        return F.layer_norm(x + self.ffn_out(h), (hidden,), self.ln2.weight, self.ln2.bias, self.eps)


    def _fused_tail(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Same function as the plain tail, with fewer passes over memory (GPU kernels)."""
        from worker.backends.kernels import bias_residual_layernorm, linear_gelu

        y = F.linear(context, self.out.weight)
        x = bias_residual_layernorm(y, self.out.bias, x, self.ln1.weight, self.ln1.bias, self.eps)
        h = linear_gelu(x, self.ffn_in.weight, self.ffn_in.bias, self.activation, self.approximate_gelu)
        if h is None:
            h = self.act(self.ffn_in(x))
        y = F.linear(h, self.ffn_out.weight)
        return bias_residual_layernorm(y, self.ffn_out.bias, x, self.ln2.weight, self.ln2.bias, self.eps)


class VarlenEncoder(nn.Module):
    """The HF encoder's weights, run over packed tokens; ``forward`` returns ``[total, hidden]``."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason:
            raise ValueError(f"cannot run this model unpadded: {reason}")
        config = hf_model.config
        self.config = config
        self.embeddings = hf_model.embeddings
        eps = float(config.layer_norm_eps)
        self.layers = nn.ModuleList(
            VarlenLayer(layer, config.num_attention_heads, eps, config.hidden_act) for layer in hf_model.encoder.layer
        )
        self.eps = eps
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # RoBERTa/XLM-R number positions from padding_idx + 1; BERT from 0.
        self.position_offset = (
            int(config.pad_token_id) + 1 if config.model_type in {"roberta", "xlm-roberta"} else 0
        )
        self.use_flash = True
        self.dense_groups = False  # dense attention per run of equal lengths (GPU), see attention()

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)
        x = x + emb.position_embeddings(positions + self.position_offset)
        return F.layer_norm(x, (x.shape[-1],), emb.LayerNorm.weight, emb.LayerNorm.bias, self.eps)

    def attention(self, cu_seqlens: torch.Tensor, max_len: int, dtype: torch.dtype,
                  groups: list[tuple[int, int, int]] | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The attention for this batch.

        ``groups`` (runs of equal-length inputs: first token, count, length; see
        :func:`equal_length_groups`) lets a batch of few distinct lengths run dense attention per
        run, with no mask and no padding, on the fastest dense kernel (``DENSE_BACKENDS``).
        Otherwise: flash varlen on the GPU, padded SDPA with a key mask elsewhere.
        """
        if groups is not None and self.dense_groups:
            return lambda q, k, v: _dense_groups(q, k, v, groups, self.scale)
        if self.use_flash and flash_available(cu_seqlens.device, dtype):
            return lambda q, k, v: _flash_varlen(q, k, v, cu_seqlens, max_len, self.scale)
        index = PaddedIndex(cu_seqlens, max_len)
        return lambda q, k, v: index.attend(q, k, v, self.scale)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor,
                cu_seqlens: torch.Tensor, max_len: int, groups: list[tuple[int, int, int]] | None = None
                ) -> torch.Tensor:
        x = self.embed(input_ids, token_type_ids, positions)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        attend = self.attention(cu_seqlens, max_len, compute_dtype, groups)
        for layer in self.layers:
            x = layer(x, attend)
        return x

    def set_fusion(self, fused: bool, approximate_gelu: bool = False) -> None:
        """Use the fused kernels of ``worker.backends.kernels`` (they fall back to torch off-GPU)."""
        for layer in self.layers:
            layer.fused = fused
            layer.approximate_gelu = approximate_gelu


def move_to_arena(module: nn.Module, device: str | torch.device) -> None:
    """Move every weight of ``module`` into one device allocation (aligned views).

    One allocation means no allocator rounding or segment slack per tensor: the weights take
    their exact size on the device, which is what keeps memory after load at transformers'.
    Mixed dtypes, or a CPU target, move tensor by tensor (``module.to``) instead.
    """
    params = list(module.parameters())
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or torch.device(device).type == "cpu":
        module.to(device)
        return
    align = 128  # elements: 256-byte aligned starts for vectorized kernels and GEMMs
    sizes = [(p.numel() + align - 1) // align * align for p in params]
    arena = torch.empty(sum(sizes), dtype=dtypes.pop(), device=device)
    offset = 0
    for param, size in zip(params, sizes):
        view = arena[offset : offset + param.numel()].view(param.shape)
        view.copy_(param.data)
        param.data = view
        offset += size


def build_encoder(hf_model: Any) -> VarlenEncoder:
    """A varlen encoder that takes over ``hf_model``'s weights (the HF model is unusable after)."""
    encoder = VarlenEncoder(hf_model).eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder
