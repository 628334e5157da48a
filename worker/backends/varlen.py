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

import numpy as np
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
    """Dense SDPA per run of equal lengths, back in the packed ``[total, heads, dim]`` layout.

    A batch that is one run (the seed workload's usual batch) returns the kernel's own output:
    cuDNN writes it in the query's stride order (token-major here), so the reshape is a view.
    Copying it into a packed buffer instead was a device-to-device copy of ``[total, hidden]``
    per layer, 2.0 ms of a 78 ms 65k-token BERT-large batch on the H100 (bench/RESULTS-gpu.md).
    Several runs still go into one buffer (``reshape`` copies too if a kernel wrote another order).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = q.shape[1], q.shape[2]
    backends = [getattr(SDPBackend, name) for name in DENSE_BACKENDS]

    def attend(first: int, count: int, length: int) -> torch.Tensor:
        end = first + count * length

        def view(x: torch.Tensor) -> torch.Tensor:
            return x[first:end].view(count, length, heads, dim).transpose(1, 2)

        return F.scaled_dot_product_attention(view(q), view(k), view(v), scale=scale).transpose(1, 2)

    with sdpa_kernel(backends, set_priority=True):
        if len(groups) == 1:
            return attend(*groups[0]).reshape(q.shape)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for first, count, length in groups:
            out[first:first + count * length].view(count, length, heads, dim).copy_(attend(first, count, length))
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


# ---------------------------------------------------------------------------- CUDA graphs of the forward
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def token_bucket(total: int, steps: int = 16, floor: int = 64) -> int:
    """The packed length a graph is captured for: ``total`` rounded up to one of ``steps`` sizes per
    octave (multiples of ``floor``), so a batch run in a graph does at most ``1/steps`` more work
    (about half that on average) on padding tokens."""
    if total <= floor:
        return floor
    step = max(floor, (1 << (int(total).bit_length() - 1)) // steps)
    return -(-int(total) // step) * step


def graph_layout(lengths: Any, max_items: int = 16384) -> tuple[int, int, int, Any] | None:
    """The bucket ``(tokens, sequences, longest)`` a packed batch runs in, and its ``cu_seqlens`` there.

    The padding after the batch's tokens is cut into sequences no longer than the bucket's longest
    (flash attention's bound), and the sequences left over are empty; so every real input attends
    to itself alone, exactly as unpadded, and the padding rows are never read by a real row. ``None``:
    the batch has more inputs than any graph takes (``max_items``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total, n = int(lengths.sum()), int(lengths.shape[0])
    longest = max(128, _next_pow2(int(lengths.max())))  # flash's query tile: shorter bounds save nothing
    tokens = token_bucket(total)
    pad = tokens - total
    pad_seqs = -(-pad // longest)
    sequences = max(8, _next_pow2(n + pad_seqs))
    if sequences > max_items:
        return None
    cu = np.full(sequences + 1, tokens, dtype=np.int32)
    cu[0] = 0
    np.cumsum(lengths, out=cu[1:n + 1])
    if pad_seqs:
        cu[n + 1:n + 1 + pad_seqs] = np.minimum(total + longest * np.arange(1, pad_seqs + 1), tokens)
    return tokens, sequences, longest, cu


class GraphedEncoder:
    """The unpadded encoder's forward and pooling replayed from CUDA graphs, one per shape bucket.

    Why: a small model's launch is CPU-bound. Measured on the H200 (bench/launch_diag.py, MiniLM,
    bf16): launching one packed batch eagerly costs ~3 ms of host CPU (~70 kernel launches through
    Python, ~45 us each) against 5.5 ms on the device for 65k tokens, and 6.6-7.8 ms per launch in
    the engine, where every op's release of the GIL can hand it to another thread for up to a
    switch interval; so the device ran dry between batches. A replay is one call: 0.35-0.6 ms of
    host time for the same batches (one ``cudaGraphLaunch`` instead of 69 launches; 2.6 ms for a
    batch of 2,000 short texts, not explained yet), at the same device time (+0-1.5% for the
    padding), measured in the same H200 call.

    A batch runs in the graph of its bucket (``graph_layout``): its tokens are staged into the
    graph's static input (ids | type ids | positions | cu_seqlens) by one host-to-device copy, the
    padding tokens have id 0 at position 0, and the pooled rows of the real inputs are the first
    ``n`` rows of the graph's static output. All graphs share one memory pool (they replay one at a
    time on one stream, so their intermediates may alias); a bucket is captured at its second batch
    (a warm-up run, then the capture), up to ``max_graphs``; its first batch, batches past that,
    and batches no bucket takes run eagerly (the caller's path).
    """

    def __init__(self, encoder: "VarlenEncoder", pool: Callable[..., torch.Tensor], pooling: str,
                 device: str | torch.device, max_graphs: int = 256) -> None:
        self.encoder = encoder
        self.pool_fn = pool
        self.pooling = pooling
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._seen: set[tuple[int, int, int]] = set()  # buckets that had one batch (captured at the next)
        self._mempool: Any = None
        self._stream: Any = None
        self.failed: str | None = None  # why capture was given up (then every launch runs eagerly)

    def _body(self, static: torch.Tensor, tokens: int, longest: int) -> torch.Tensor:
        ids, types, positions = static[:tokens], static[tokens:2 * tokens], static[2 * tokens:3 * tokens]
        cu = static[3 * tokens:]
        hidden = self.encoder(ids, types, positions, cu, longest, None)
        return self.pool_fn(hidden, cu, self.pooling).float()

    def _capture(self, key: tuple[int, int, int], static: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Capture the bucket's graph over ``static`` (already holding this batch, staged)."""
        tokens, _, longest = key
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._body(static, tokens, longest)  # warm-up: lazy library state is set up outside the capture
            # thread-local: the engine's other threads (copies back, pinned allocations) go on meanwhile
            graph.capture_begin(pool=self._mempool, capture_error_mode="thread_local")
            try:
                out = self._body(static, tokens, longest)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        entry = (graph, static, out)
        self.graphs[key] = entry
        return entry

    def launch(self, flat: torch.Tensor, lengths: Any) -> torch.Tensor | None:
        """Queue the batch packed in ``flat`` (host int32 ids | type ids | positions | cu_seqlens, as
        ``TorchBackend._packed_host`` makes it) as a graph replay; its pooled ``[n, H]`` float32 rows
        (a view of the graph's static output, valid until the next replay of that graph on this
        stream), or ``None`` when the caller must run it eagerly: a bucket's first batch (a bucket is
        captured on its second, so a short job whose batches all differ never pays for captures:
        ~20 ms of host time each on the H200), no bucket, or past ``max_graphs``."""
        if self.failed is not None:
            return None
        layout = graph_layout(lengths)
        if layout is None:
            return None
        key = layout[:3]
        entry = self.graphs.get(key)
        if entry is None and (key not in self._seen or len(self.graphs) >= self.max_graphs):
            if len(self._seen) < 16 * self.max_graphs:
                self._seen.add(key)
            return None
        tokens, sequences, _ = key
        static = torch.empty(3 * tokens + sequences + 1, dtype=torch.int32, device=self.device) \
            if entry is None else entry[1]
        staging = torch.empty(static.shape[0], dtype=torch.int32, pin_memory=True)
        stage(flat.numpy(), len(lengths), layout, staging.numpy())
        static.copy_(staging, non_blocking=True)
        if entry is None:
            try:
                entry = self._capture(key, static)
            except Exception as exc:  # never fail a batch for a graph: run it eagerly from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed, the encoder runs eagerly: %s", self.failed)
                return None
        graph, _, out = entry
        graph.replay()
        return out[:len(lengths)]


def stage(src: np.ndarray, n: int, layout: tuple[int, int, int, np.ndarray], out: np.ndarray) -> None:
    """Lay a packed batch (``src``: int32 ids | type ids | positions | cu_seqlens of its ``n`` inputs)
    out as its graph bucket takes it (``layout`` from :func:`graph_layout`) in ``out``: each part
    padded to the bucket's tokens with id 0 at position 0 (every padding token a valid index),
    then the bucket's ``cu_seqlens``."""
    tokens, _, _, cu = layout
    total = int(cu[n])
    for part in range(3):
        out[part * tokens:part * tokens + total] = src[part * total:(part + 1) * total]
        out[part * tokens + total:(part + 1) * tokens] = 0
    out[3 * tokens:] = cu
