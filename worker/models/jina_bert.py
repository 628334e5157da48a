"""JinaBERT v2 (jina-embeddings-v2-*: small/base/large, the multilingual and code variants), natively.

Why native: the published folders say ``model_type: bert`` and point ``auto_map`` at code on the
hub (``jinaai/jina-bert-implementation``, ``jinaai/jina-bert-v2-qk-post-norm``) that is not in the
folder. transformers' ``BertModel`` reads such a config as plain BERT: it has no ALiBi and no GLU,
so the position embeddings and the feed-forward would be randomly initialized and every vector
garbage. This module is the architecture, written from its definition (the paper, arXiv
2310.19923, and the ports in TEI's ``backends/candle/src/models/jina.rs``/``jina_code.rs``), with
submodules named like the checkpoints' tensors so their state dict loads by name.

The maths, per layer (post-norm, as BERT):

* embeddings: ``LayerNorm(word[ids] + token_type[types])``; no position embeddings.
* attention: ``softmax(q k^T / sqrt(d) + alibi + key mask) v`` with the symmetric ALiBi bias
  ``alibi[h, i, j] = -m_h |i - j|`` (``m_h``: the ALiBi paper's geometric slopes, with its
  interleaving rule for head counts that are not powers of two), then
  ``x = LayerNorm(x + dense(a))`` (``attention.output.*``).
* feed-forward by ``feed_forward_type``: ``geglu``/``reglu``:
  ``g, u = split(gated_layers(x)); x = layernorm(x + wo(act(g) * u))`` (``mlp.*``; act: exact
  GELU or ReLU); ``original``: BERT's ``intermediate``/``output`` with ``hidden_act``.
* the qk-post-norm variant (jina-embeddings-v2-base-code, found by its ``layer_norm_q`` tensors):
  q and k are LayerNormed after their projections; after attention ``x = layer_norm_1(x_in + a)``;
  the GLU is ``u, g = split(up_gated_layer(x)); x = layer_norm_2(x + down_layer(u * act(g)))``.

Attention runs with the ALiBi bias on every device: SDPA with an fp32 bias in fp32; in fp16/bf16
the scores, the bias and the softmax are fp32 (``alibi_attention``), so fp16 cannot overflow into
NaN and bf16 does not round the bias, and queries are taken in blocks so an 8,192-token input
never materializes more than a bounded ``[block, length]`` score matrix per head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from producer.errors import UnsupportedModel

FAMILY = "jina-bert-v2"
#: feed-forward types the published checkpoints use
FEED_FORWARD_TYPES = ("geglu", "reglu", "original")
#: the hub repositories whose code this module reimplements
REMOTE_CODE = ("jinaai/jina-bert-implementation", "jinaai/jina-bert-v2-qk-post-norm")
#: checkpoint tensors this module does not use, with the reason (the faithful check allows them)
HARMLESS_UNUSED = (
    (r"^pooler\.", "the pooler feeds only a classification head; embeddings mean-pool the token states"),
    (r"^cls\.", "the masked-LM head of the checkpoint's JinaBertForMaskedLM is not part of its embeddings"),
    (r"position_ids$", "a buffer older checkpoints saved; positions do not exist under ALiBi"),
    (r"embeddings\.token_type_ids$", "a buffer of zeros some checkpoints saved; type ids come with each input"),
)
_QK_NORM = re.compile(r"attention\.self\.layer_norm_q\.weight$")
#: query rows per attention block: bounds the fp32 score matrix for long inputs
_SCORE_BYTES = 256 << 20
_HIDDEN_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def detect(config: dict[str, Any]) -> bool:
    """Whether a config is JinaBERT v2's: BERT with ALiBi or a GLU, or pointing at Jina's code."""
    if config.get("model_type") != "bert":
        return False
    auto_map = " ".join(str(v) for v in (config.get("auto_map") or {}).values())
    return (config.get("position_embedding_type") == "alibi"
            or config.get("feed_forward_type", "original") != "original"
            or any(repo in auto_map for repo in REMOTE_CODE))


@dataclass(frozen=True)
class JinaConfig:
    """The fields of a JinaBERT v2 config.json this architecture reads."""

    #: what the backends see (the unpadded CUDA encoder reimplements BERT only, so it declines this)
    model_type: ClassVar[str] = FAMILY
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    feed_forward_type: str
    qk_post_norm: bool

    @classmethod
    def read(cls, config: dict[str, Any], tensor_names: list[str]) -> "JinaConfig":
        """The config, refused with the reason when it asks for something this module lacks."""
        if config.get("position_embedding_type", "absolute") != "alibi":
            raise UnsupportedModel(
                f"JinaBERT with position_embedding_type={config.get('position_embedding_type')!r}: only 'alibi' "
                "(every published jina-embeddings-v2 model) is implemented")
        ffn = str(config.get("feed_forward_type", "original"))
        if ffn not in FEED_FORWARD_TYPES:
            raise UnsupportedModel(f"JinaBERT feed_forward_type={ffn!r} is not one of {', '.join(FEED_FORWARD_TYPES)}")
        hidden_act = str(config.get("hidden_act", "gelu"))
        if ffn == "original" and hidden_act not in _HIDDEN_ACTS:
            raise UnsupportedModel(f"JinaBERT hidden_act={hidden_act!r} is not one of {', '.join(_HIDDEN_ACTS)}")
        qk_post_norm = any(_QK_NORM.search(name) for name in tensor_names)
        if qk_post_norm and ffn == "original":
            raise UnsupportedModel("JinaBERT qk-post-norm with feed_forward_type='original' is not a published "
                                   "variant and is not implemented")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if hidden % heads:
            raise UnsupportedModel(f"JinaBERT hidden_size {hidden} is not a multiple of {heads} heads")
        return cls(
            vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=heads,
            intermediate_size=int(config["intermediate_size"]), type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), hidden_act=hidden_act,
            feed_forward_type=ffn, qk_post_norm=qk_post_norm,
        )

    @property
    def variant(self) -> str:
        """What this checkpoint is, for logs and ``embedfleet models``."""
        return f"JinaBERT v2{' qk-post-norm' if self.qk_post_norm else ''}, {self.feed_forward_type} feed-forward, ALiBi"


# ---------------------------------------------------------------------------- ALiBi
def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi slopes: a geometric series from 2^(-8/n) for n a power of two; otherwise those of
    the nearest lower power of two, then every other slope of the next power of two."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def _query_block(batch: int, heads: int, length: int) -> int:
    """Query rows per block so that one block's fp32 scores stay within ``_SCORE_BYTES``."""
    return max(16, min(length, _SCORE_BYTES // max(1, batch * heads * length * 4)))


@lru_cache(maxsize=4)
def _matmul_out_fp32(dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` tensors into fp32 outputs on CUDA (``bmm(out_dtype=)``)."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(1, 1, 1, device="cuda", dtype=dtype)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _scores_fp32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q k^T`` in fp32: half inputs are exact in fp32, so only the accumulation type changes."""
    b, h, t, d = q.shape
    if q.is_cuda and _matmul_out_fp32(q.dtype):
        out = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, -1, d).transpose(1, 2), out_dtype=torch.float32)
        return out.view(b, h, t, -1)
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                    key_padding: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention with the symmetric ALiBi bias; ``[B, H, T, D]`` in, same out.

    ``slopes``: ``[H]`` fp32; ``key_padding``: ``[B, T]`` True where a key is padding. The bias is
    built per block of queries (never ``[T, T]`` for the whole input at once), always in fp32.
    """
    batch, heads, length, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    positions = torch.arange(length, device=q.device)
    pad = key_padding[:, None, None, :] if key_padding is not None else None
    out = torch.empty_like(q)
    block = _query_block(batch, heads, length)
    with torch.autocast(q.device.type, enabled=False):  # scores stay fp32 even under autocast
        for start in range(0, length, block):
            rows = positions[start : start + block]
            bias = (rows[:, None] - positions[None, :]).abs().to(torch.float32)
            bias = (-slopes[:, None, None] * bias).unsqueeze(0)  # [1, H, rows, T]
            if pad is not None:
                bias = bias.masked_fill(pad, float("-inf"))
            q_block = q[:, :, start : start + block]
            if q.dtype == torch.float32:
                out[:, :, start : start + block] = F.scaled_dot_product_attention(q_block, k, v, attn_mask=bias,
                                                                                  scale=scale)
                continue
            scores = _scores_fp32(q_block, k).mul_(scale).add_(bias)
            probs = torch.softmax(scores, dim=-1)
            out[:, :, start : start + block] = torch.matmul(probs.to(v.dtype), v)
    return out


# ---------------------------------------------------------------------------- the modules
class _Embeddings(nn.Module):
    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids))


class _SelfAttention(nn.Module):
    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        if c.qk_post_norm:
            self.layer_norm_q = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.layer_norm_k = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.qk_post_norm = c.qk_post_norm

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, slopes: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.qk_post_norm:
            q, k = self.layer_norm_q(q), self.layer_norm_k(k)
        a = alibi_attention(self._heads(q), self._heads(k), self._heads(v), slopes, key_padding)
        return a.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class _DenseNorm(nn.Module):
    """``LayerNorm(residual + dense(x))``: BERT's ``*.output`` block."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class _Attention(nn.Module):
    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, slopes: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, slopes, key_padding), x)


def _glu_act(feed_forward_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return F.relu if feed_forward_type == "reglu" else F.gelu  # geglu: exact (erf) GELU


class _GluMlp(nn.Module):
    """``layernorm(x + wo(act(g) * u))`` with ``g, u`` the two halves of ``gated_layers(x)``."""

    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.gated_layers = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.wo = nn.Linear(c.intermediate_size, c.hidden_size)
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.act = _glu_act(c.feed_forward_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated, up = self.gated_layers(x).chunk(2, dim=-1)
        return self.layernorm(x + self.wo(self.act(gated) * up))


class _CodeGluMlp(nn.Module):
    """qk-post-norm variant: ``down_layer(u * act(g))`` with ``u, g`` the halves of ``up_gated_layer(x)``."""

    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.up_gated_layer = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_layer = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _glu_act(c.feed_forward_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gated = self.up_gated_layer(x).chunk(2, dim=-1)
        return self.down_layer(up * self.act(gated))


class _Layer(nn.Module):
    def __init__(self, c: JinaConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.kind = "code" if c.qk_post_norm else ("glu" if c.feed_forward_type != "original" else "original")
        if self.kind == "code":
            self.layer_norm_1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.mlp = _CodeGluMlp(c)
            self.layer_norm_2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        elif self.kind == "glu":
            self.mlp = _GluMlp(c)
        else:
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
            self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)
            self.act = _HIDDEN_ACTS[c.hidden_act]

    def forward(self, x: torch.Tensor, slopes: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, slopes, key_padding)
        if self.kind == "code":
            h = self.layer_norm_1(x + a)
            return self.layer_norm_2(h + self.mlp(h))
        if self.kind == "glu":
            return self.mlp(a)
        return self.output(self.act(self.intermediate.dense(a)), a)


@dataclass
class EncoderOutput:
    """What the torch backend reads of an encoder's output (as transformers names it)."""

    last_hidden_state: torch.Tensor


class JinaBertModel(nn.Module):
    """The encoder; ``forward`` takes transformers' arguments and returns ``last_hidden_state``."""

    def __init__(self, config: JinaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        self.register_buffer("slopes", torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32),
                             persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "JinaBertModel":
        """``.to(dtype)`` moves the slopes with the module but never halves them."""
        super()._apply(fn, recurse)
        self.slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), dtype=torch.float32,
                                   device=self.slopes.device)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask == 0
        for layer in self.encoder.layer:
            x = layer(x, self.slopes, key_padding)
        return EncoderOutput(last_hidden_state=x)


def checkpoint_names(names: list[str]) -> dict[str, str]:
    """Checkpoint name -> module name: the weights live at the root, or under ``bert.`` (as a
    JinaBertForMaskedLM saves them)."""
    prefixed = any(name.startswith("bert.encoder.") for name in names)
    return {name: name.removeprefix("bert.") if prefixed else name for name in names}


def build(config: dict[str, Any], tensors: dict[str, torch.Tensor],
          dtype: torch.dtype) -> tuple[JinaBertModel, list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """The model with the checkpoint's tensors in it; returns it with the (missing, unused,
    mismatched) names, for ``worker.models.loading`` to judge."""
    jina_config = JinaConfig.read(config, list(tensors))
    model = JinaBertModel(jina_config)
    expected = model.state_dict()
    renamed = {checkpoint_names(list(tensors))[name]: tensor for name, tensor in tensors.items()}
    mismatched = [(name, tuple(t.shape), tuple(expected[name].shape)) for name, t in renamed.items()
                  if name in expected and tuple(t.shape) != tuple(expected[name].shape)]
    loadable = {name: t for name, t in renamed.items() if name in expected and tuple(t.shape) == tuple(expected[name].shape)}
    missing = sorted(set(expected) - set(loadable) - {m[0] for m in mismatched})
    unused = sorted(set(renamed) - set(expected))
    model.load_state_dict(loadable, strict=False)
    return model.to(dtype).eval(), missing, unused, mismatched
