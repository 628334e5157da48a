"""JinaBERT v2, served natively: the engine against a plain, slow reference written here from the
architecture's definition, on tiny random weights saved under the published checkpoints' names.

The reference works on one text at a time, in float64, head by head, with the ALiBi slopes from
the ALiBi paper's formula (2^(-8i/n), and the interleaving rule for other head counts), so it
shares no code with ``worker.models.jina_bert``. The engine runs padded batches of mixed lengths,
several past 512 tokens, so the key mask and the blocked bias are exercised too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.errors import UnsupportedModel
from producer.jobs import JobKind
from worker.models.jina_bert import alibi_attention, alibi_slopes
from worker.models.resolve import describe

from tests.families import save_jina, tiny_jina_model  # noqa: F401  (fixture)
from tests.fixtures_extra import cosine_rows, make_engine, sample_texts

COS_MIN = 0.9999


# ---------------------------------------------------------------------------- the reference
def reference_slopes(heads: int) -> list[float]:
    """ALiBi (Press et al.): m_i = 2^(-8i/n), i = 1..n for n a power of two; otherwise the
    slopes of the closest lower power of two p, then the odd-indexed slopes of 2p."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    if heads & (heads - 1) == 0:
        return geometric(heads)
    p = 2 ** int(math.floor(math.log2(heads)))
    return geometric(p) + geometric(2 * p)[0::2][: heads - p]


def _ln(x: torch.Tensor, t: dict[str, torch.Tensor], name: str, eps: float = 1e-12) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]


def _lin(x: torch.Tensor, t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ t[f"{name}.weight"].T
    return out + t[f"{name}.bias"] if f"{name}.bias" in t else out


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_hidden(t: dict[str, torch.Tensor], ids: list[int], types: list[int], heads: int, layers: int,
                     ffn: str, qk_post_norm: bool) -> torch.Tensor:
    """Token states ``[T, H]`` of one text, straight from the definition."""
    t = {k: v.double() for k, v in t.items()}
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"][types]
    x = _ln(x, t, "embeddings.LayerNorm")
    n, hidden = x.shape
    d = hidden // heads
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()
    act = (lambda v: torch.clamp(v, min=0)) if ffn == "reglu" else _gelu
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (_lin(x, t, f"{p}.attention.self.{w}") for w in ("query", "key", "value"))
        if qk_post_norm:
            q, k = _ln(q, t, f"{p}.attention.self.layer_norm_q"), _ln(k, t, f"{p}.attention.self.layer_norm_k")
        context = torch.zeros_like(x)
        for h, slope in enumerate(reference_slopes(heads)):
            cols = slice(h * d, (h + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d) - slope * distance
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            context[:, cols] = (weights / weights.sum(dim=1, keepdim=True)) @ v[:, cols]
        a = _ln(x + _lin(context, t, f"{p}.attention.output.dense"), t, f"{p}.attention.output.LayerNorm")
        if qk_post_norm:
            h1 = _ln(x + a, t, f"{p}.layer_norm_1")
            both = _lin(h1, t, f"{p}.mlp.up_gated_layer")
            up, gate = both[:, : both.shape[1] // 2], both[:, both.shape[1] // 2:]
            x = _ln(h1 + _lin(up * act(gate), t, f"{p}.mlp.down_layer"), t, f"{p}.layer_norm_2")
        elif ffn == "original":
            inner = _gelu(_lin(a, t, f"{p}.intermediate.dense"))
            x = _ln(a + _lin(inner, t, f"{p}.output.dense"), t, f"{p}.output.LayerNorm")
        else:
            both = _lin(a, t, f"{p}.mlp.gated_layers")
            gate, up = both[:, : both.shape[1] // 2], both[:, both.shape[1] // 2:]
            x = _ln(a + _lin(act(gate) * up, t, f"{p}.mlp.wo"), t, f"{p}.mlp.layernorm")
    return x


def reference_embeddings(folder: Path, ids_list: list[list[int]], heads: int, layers: int, ffn: str,
                         qk_post_norm: bool) -> np.ndarray:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    rows = [reference_hidden(tensors, ids, [0] * len(ids), heads, layers, ffn, qk_post_norm).mean(0) for ids in ids_list]
    return torch.stack(rows).numpy()


def long_texts() -> list[str]:
    """Mixed lengths, three of them past 512 tokens (and one past 1,000)."""
    corpus = sample_texts(400, step=29)
    short = corpus[:5]
    long = [" ".join(corpus[i : i + n]) for i, n in ((10, 40), (60, 70), (140, 110))]
    return short + long + ["word"]


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12, 16])
def test_alibi_slopes_follow_the_paper(heads: int) -> None:
    np.testing.assert_allclose(alibi_slopes(heads), reference_slopes(heads), rtol=1e-12)


VARIANTS = [
    pytest.param("geglu", False, 4, id="geglu"),
    pytest.param("reglu", False, 6, id="reglu-6-heads"),
    pytest.param("original", False, 4, id="original-mlp"),
    pytest.param("geglu", True, 4, id="code-qk-post-norm"),
]


@pytest.mark.parametrize("ffn,qk_post_norm,heads", VARIANTS)
def test_matches_the_reference_past_512_tokens(tmp_path: Path, ffn: str, qk_post_norm: bool, heads: int) -> None:
    folder = save_jina(tmp_path / f"jina-{ffn}", ffn=ffn, qk_post_norm=qk_post_norm, heads=heads, hidden=24 if heads == 6 else 32,
                       seed=len(ffn) + 7 * qk_post_norm)
    info = describe(str(folder))
    assert (info.family, info.kind, info.pooling, info.max_length) == ("jina-bert-v2", JobKind.embed, "mean", 8192)
    engine = make_engine(folder, max_batch_tokens=8192)
    try:
        texts = long_texts()
        result = engine.run(texts, timeout=300)
        assert not result.errors
        assert max(result.n_tokens) > 1000 and sum(n > 512 for n in result.n_tokens) == 3
        ids = [e.ids.tolist() for e in engine.tokenizer.encode(texts)]
        want = reference_embeddings(folder, ids, heads, 2, ffn, qk_post_norm)
        got = result.values
        assert np.isfinite(got).all()
        cos = cosine_rows(got, want)
        assert cos.min() >= COS_MIN, f"{ffn}: cosine {cos.min():.7f} (per text: {np.round(cos, 6)})"
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
    finally:
        engine.stop()


def test_weights_under_the_bert_prefix_load_too(tmp_path: Path) -> None:
    """A JinaBertForMaskedLM save keeps the encoder under ``bert.``: the same vectors come out."""
    plain = save_jina(tmp_path / "plain", seed=3)
    prefixed = save_jina(tmp_path / "prefixed", seed=3, prefix="bert.")
    texts = sample_texts(6, step=97)
    a, b = make_engine(plain), make_engine(prefixed)
    try:
        np.testing.assert_allclose(a.run(texts, timeout=60).values, b.run(texts, timeout=60).values, rtol=1e-6, atol=1e-7)
    finally:
        a.stop()
        b.stop()


def test_a_missing_tensor_is_refused_by_name(tmp_path: Path) -> None:
    folder = save_jina(tmp_path / "incomplete", drop=["encoder.layer.1.mlp.wo.weight"])
    with pytest.raises(UnsupportedModel, match=r"encoder\.layer\.1\.mlp\.wo\.weight.*randomly initialized|"
                                               r"randomly initialized.*encoder\.layer\.1\.mlp\.wo\.weight"):
        make_engine(folder)


def test_an_unknown_tensor_is_refused_by_name(tmp_path: Path) -> None:
    folder = save_jina(tmp_path / "extra", extra={"encoder.layer.0.attention.self.rotary.weight": torch.zeros(4)})
    with pytest.raises(UnsupportedModel, match=r"unused: encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        make_engine(folder)


def test_fp32_engine_and_the_bf16_half_path_agree(tiny_jina_model: Path) -> None:  # noqa: F811
    """The half-precision attention (fp32 scores, bias and softmax) run on the CPU in bf16: close
    to fp32 and finite. The CUDA run of the same path is in tests/backends/test_gpu_paths.py."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 700, 8) for _ in range(3))
    slopes = torch.tensor(alibi_slopes(4))
    padding = torch.zeros(2, 700, dtype=torch.bool)
    padding[1, 500:] = True
    full = alibi_attention(q, k, v, slopes, padding)
    half = alibi_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slopes, padding).float()
    assert torch.isfinite(half).all()
    cos = torch.nn.functional.cosine_similarity(full.flatten(2), half.flatten(2), dim=-1)
    assert cos.min() > 0.999
    # fp16 scores far past fp16's range stay finite: they are never formed in fp16
    big = alibi_attention((q * 300).half(), (k * 300).half(), v.half(), slopes, padding)
    assert torch.isfinite(big).all()


def test_an_8192_token_input_runs_whole(tiny_jina_model: Path) -> None:  # noqa: F811
    engine = make_engine(tiny_jina_model, max_batch_tokens=16384)
    try:
        text = " ".join(sample_texts(2000, step=3))[:99_000]
        result = engine.run([text, "short"], timeout=600)
        assert not result.errors
        assert result.n_tokens[0] == 8192 and result.truncated[0] and not result.truncated[1]
        assert np.isfinite(result.values).all()
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_the_cpu_stays_within_the_bar(tmp_path: Path, dtype: str) -> None:
    """The CUDA run's CPU twin: the whole model in bf16/fp16 (fp32 scores, bias and softmax in
    attention) against fp32, on inputs past 512 tokens. tests/backends/test_gpu_families.py
    runs the same comparison on a GPU."""
    from worker.backends.torch import TorchBackend
    from worker.engine.pipeline import Engine

    folder = save_jina(tmp_path / "jina", hidden=64, intermediate=128, seed=1)
    info = describe(str(folder))
    values = {}
    for name in ("float32", dtype):
        engine = Engine(info, TorchBackend(info, "cpu", name), max_batch_tokens=8192).start()
        try:
            result = engine.run(long_texts(), timeout=300)
        finally:
            engine.stop()
        assert not result.errors
        values[name] = result.values
    assert np.isfinite(values[dtype]).all()
    assert cosine_rows(values[dtype], values["float32"]).min() >= COS_MIN


def test_the_unpadded_encoder_declines_it_by_name(tiny_jina_model: Path) -> None:  # noqa: F811
    """On CUDA the torch backend asks the unpadded BERT encoder first; it must say no (ALiBi is
    not BERT's positions), and the padded ALiBi path runs instead."""
    from producer.errors import BadInput
    from worker.backends.torch import TorchBackend

    info = describe(str(tiny_jina_model))
    with pytest.raises(BadInput, match=r"cannot run unpadded: model type 'jina-bert-v2'"):
        TorchBackend(info, "cpu", "float32", varlen=True)
    assert not TorchBackend(info, "cpu", "float32").unpadded


def test_the_buffers_and_heads_published_checkpoints_carry_are_allowed(tmp_path: Path) -> None:
    """Old saves carry position-id / type-id buffers and the masked-LM head: unused, harmless, said why."""
    from worker.models.loading import inspect_loading

    extra = {"embeddings.position_ids": torch.arange(8192)[None], "embeddings.token_type_ids": torch.zeros(1, 8192),
             "cls.predictions.bias": torch.zeros(30528)}
    verdict = inspect_loading(describe(str(save_jina(tmp_path / "jina", prefix="bert.", extra=extra))))
    assert verdict.faithful, verdict.reason
    allowed = sorted(name for names in verdict.allowed.values() for name in names)
    assert allowed == ["cls.predictions.bias", "embeddings.position_ids", "embeddings.token_type_ids",
                       "pooler.dense.bias", "pooler.dense.weight"]
