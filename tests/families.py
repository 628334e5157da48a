"""Tiny random models of the families served natively or newly tested (issue #14), as folders.

Each builder writes what a published checkpoint's folder holds: config.json as the hub's says it,
the weights under the checkpoint's tensor names (safetensors), a tokenizer, and the
sentence-transformers files where the real models have them. Weights are random but scaled so
activations stay in a sane range, which is all a comparison with a reference needs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch

from tests.conftest import bundled_path

JINA_AUTO_MAP = {
    "AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
    "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel",
    "AutoModelForMaskedLM": "jinaai/jina-bert-implementation--modeling_bert.JinaBertForMaskedLM",
}
JINA_CODE_AUTO_MAP = {
    "AutoConfig": "jinaai/jina-bert-v2-qk-post-norm--configuration_bert.JinaBertConfig",
    "AutoModel": "jinaai/jina-bert-v2-qk-post-norm--modeling_bert.JinaBertModel",
}


def _linear(gen: torch.Generator, out: int, inp: int, bias: bool = True) -> dict[str, torch.Tensor]:
    weights = {"weight": torch.randn(out, inp, generator=gen) / math.sqrt(inp)}
    if bias:
        weights["bias"] = 0.1 * torch.randn(out, generator=gen)
    return weights


def _norm(gen: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    return {"weight": 1 + 0.1 * torch.randn(size, generator=gen), "bias": 0.1 * torch.randn(size, generator=gen)}


def _put(tensors: dict[str, torch.Tensor], prefix: str, parts: dict[str, torch.Tensor]) -> None:
    for name, tensor in parts.items():
        tensors[f"{prefix}.{name}"] = tensor.contiguous()


def jina_tensors(ffn: str, qk_post_norm: bool, hidden: int, heads: int, layers: int, intermediate: int,
                 vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """The tensors of a JinaBERT v2 checkpoint, by the published names (plus its pooler)."""
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": torch.randn(vocab, hidden, generator=gen),
        "embeddings.token_type_embeddings.weight": torch.randn(2, hidden, generator=gen),
    }
    _put(t, "embeddings.LayerNorm", _norm(gen, hidden))
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            _put(t, f"{p}.attention.self.{name}", _linear(gen, hidden, hidden))
        _put(t, f"{p}.attention.output.dense", _linear(gen, hidden, hidden))
        _put(t, f"{p}.attention.output.LayerNorm", _norm(gen, hidden))
        if qk_post_norm:
            _put(t, f"{p}.attention.self.layer_norm_q", _norm(gen, hidden))
            _put(t, f"{p}.attention.self.layer_norm_k", _norm(gen, hidden))
            _put(t, f"{p}.layer_norm_1", _norm(gen, hidden))
            _put(t, f"{p}.mlp.up_gated_layer", _linear(gen, 2 * intermediate, hidden, bias=False))
            _put(t, f"{p}.mlp.down_layer", _linear(gen, hidden, intermediate))
            _put(t, f"{p}.layer_norm_2", _norm(gen, hidden))
        elif ffn == "original":
            _put(t, f"{p}.intermediate.dense", _linear(gen, intermediate, hidden))
            _put(t, f"{p}.output.dense", _linear(gen, hidden, intermediate))
            _put(t, f"{p}.output.LayerNorm", _norm(gen, hidden))
        else:
            _put(t, f"{p}.mlp.gated_layers", _linear(gen, 2 * intermediate, hidden, bias=False))
            _put(t, f"{p}.mlp.wo", _linear(gen, hidden, intermediate))
            _put(t, f"{p}.mlp.layernorm", _norm(gen, hidden))
    _put(t, "pooler.dense", _linear(gen, hidden, hidden))
    return t


def copy_tokenizer(dest: Path, max_length: int) -> None:
    """The bundled model's tokenizer, with ``model_max_length`` set as the folder's model says."""
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_path() / name, dest / name)
    config = json.loads((bundled_path() / "tokenizer_config.json").read_text())
    config["model_max_length"] = max_length
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


def write_st_files(dest: Path, pooling: str, max_length: int, hidden: int, normalize: bool = False,
                   prompts: dict[str, str] | None = None, default_prompt_name: str | None = None) -> None:
    """modules.json, the pooling config and config_sentence_transformers.json, as sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))
    (dest / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": prompts or {}, "default_prompt_name": default_prompt_name}))


def save_jina(dest: Path, ffn: str = "geglu", qk_post_norm: bool = False, heads: int = 4, layers: int = 2,
              hidden: int = 32, intermediate: int = 48, seed: int = 0, prefix: str = "",
              drop: Iterable[str] = (), extra: dict[str, torch.Tensor] | None = None,
              max_length: int = 8192) -> Path:
    """A jina-embeddings-v2-style folder (config as the hub's, tensors by the checkpoint's names)."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    vocab = 30528
    tensors = jina_tensors(ffn, qk_post_norm, hidden, heads, layers, intermediate, vocab, seed)
    for name in drop:
        del tensors[name]
    tensors.update(extra or {})
    save_file({prefix + k: v for k, v in tensors.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "_name_or_path": "jinaai/jina-bert-v2-qk-post-norm" if qk_post_norm else "jinaai/jina-bert-implementation",
        "architectures": ["JinaBertForMaskedLM"], "auto_map": JINA_CODE_AUTO_MAP if qk_post_norm else JINA_AUTO_MAP,
        "attention_probs_dropout_prob": 0.0, "classifier_dropout": None, "emb_pooler": "mean",
        "feed_forward_type": ffn, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 8192, "model_max_length": 8192, "model_type": "bert",
        "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 0,
        "position_embedding_type": "alibi", "torch_dtype": "float32", "transformers_version": "4.26.0",
        "type_vocab_size": 2, "use_cache": True, "vocab_size": vocab,
    }
    (dest / "config.json").write_text(json.dumps(config))
    copy_tokenizer(dest, max_length)
    write_st_files(dest, "mean", max_length, hidden)
    return dest


@pytest.fixture(scope="session")
def tiny_jina_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jina-embeddings-v2-base-en-style folder (geglu), tiny."""
    return save_jina(tmp_path_factory.mktemp("models") / "tiny-jina-embeddings-v2")


# ---------------------------------------------------------------------------- decoder rerankers
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def qwen_style_tokenizer(dest: Path, texts: list[str], vocab_size: int = 600, max_length: int = 1024) -> int:
    """A byte-level BPE tokenizer (as Qwen's) trained on ``texts``, with Qwen's special tokens and
    single tokens for "yes"/"no"; saved as transformers saves it. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens(["yes", "no"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=max_length)
    fast.save_pretrained(str(dest))
    return len(fast)


def save_qwen3_causal_lm(dest: Path, texts: list[str], seed: int = 5, tie: bool = True, max_length: int = 1024,
                         layers: int = 2) -> Path:
    """A tiny random Qwen3ForCausalLM with its own tokenizer: what a Qwen3-Reranker folder holds."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    vocab = qwen_style_tokenizer(dest, texts, max_length=max_length)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # a random init of std 0.02 gives near-equal logits; spread them
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    model.save_pretrained(str(dest))
    return dest


def save_qwen3_embedding(dest: Path, texts: list[str], seed: int = 3, layers: int = 2, max_length: int = 1024,
                         **config: Any) -> Path:
    """A tiny random Qwen3-Embedding folder: a bare Qwen3Model (GQA 4/2 heads, q/k norms), its own
    tokenizer ending every text with ``<|endoftext|>`` as the real one does, and the
    sentence-transformers files with last-token pooling and normalization."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    dest.mkdir(parents=True, exist_ok=True)
    vocab = qwen_style_tokenizer(dest, texts, max_length=max_length)
    fast = PreTrainedTokenizerFast.from_pretrained(str(dest))
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    fast.save_pretrained(str(dest))
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                    rope_theta=1_000_000.0, tie_word_embeddings=True, pad_token_id=eos, eos_token_id=eos,
                    bos_token_id=None)
    settings.update(config)
    model = Qwen3Model(Qwen3Config(**settings)).eval()
    with torch.no_grad():  # std 0.02 leaves every token state alike; spread them
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 1.0 / math.sqrt(param.shape[1]) if "embed" not in name else 1.0)
            else:
                param.uniform_(0.5, 1.5)  # the RMSNorm weights
    model.save_pretrained(str(dest))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (dest / "modules.json").write_text(json.dumps(modules))
    for sub in ("1_Pooling", "2_Normalize"):
        (dest / sub).mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": settings["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True}))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    return dest


# ---------------------------------------------------------------------------- a folder with its own code
REMOTE_CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom-embedder"

    def __init__(self, vocab_size=30522, hidden_size=16, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''
REMOTE_MODELING_PY = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tiny import TinyCustomConfig


class TinyCustomModel(PreTrainedModel):
    """An embedding table, then one tanh layer mixing each token with the text's mean."""

    config_class = TinyCustomConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        x = self.embed(input_ids)
        mask = attention_mask.unsqueeze(-1).to(x.dtype) if attention_mask is not None else torch.ones_like(x[..., :1])
        mean = (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return BaseModelOutput(last_hidden_state=torch.tanh(self.mix(torch.cat([x, mean.expand_as(x)], -1))))
'''


def save_remote_code_model(dest: Path, seed: int = 11) -> Path:
    """A folder that ships its own model code (auto_map to files in the folder), as many hub
    models do; it runs only with --trust-remote-code."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "configuration_tiny.py").write_text(REMOTE_CONFIG_PY)
    (dest / "modeling_tiny.py").write_text(REMOTE_MODELING_PY)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"embed.weight": torch.randn(30522, 16, generator=gen), **{
        f"mix.{k}": v for k, v in _linear(gen, 16, 32).items()}}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["TinyCustomModel"], "model_type": "tiny-custom-embedder", "vocab_size": 30522,
        "hidden_size": 16, "auto_map": {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                                        "AutoModel": "modeling_tiny.TinyCustomModel"}}))
    copy_tokenizer(dest, 128)
    return dest


def save_bge_m3(dest: Path, seed: int = 6, hidden: int = 32, colbert_dim: int = 24, max_length: int = 128,
                heads: Iterable[str] = ("sparse", "multivector")) -> Path:
    """A bge-m3 folder in FlagEmbedding's layout on a tiny random XLM-R: the encoder, the
    sentence-transformers files (CLS pooling, normalized), ``sparse_linear.pt`` (hidden -> 1) and
    ``colbert_linear.pt`` (hidden -> d) as ``torch.save(linear.state_dict())``, and a tokenizer
    that names an eos token (XLM-R's ``</s>``; here the bundled tokenizer's ``[SEP]``)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    config = XLMRobertaConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=max_length + 2, pad_token_id=0,
                              bos_token_id=101, eos_token_id=102, type_vocab_size=1)
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(dest)
    copy_tokenizer(dest, max_length)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        named = json.loads((dest / name).read_text())
        named["eos_token"] = "[SEP]"
        (dest / name).write_text(json.dumps(named))
    write_st_files(dest, "cls", max_length, hidden, normalize=True)
    if "sparse" in heads:
        sparse = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(sparse.weight, std=0.5)
        torch.save(sparse.state_dict(), dest / "sparse_linear.pt")
    if "multivector" in heads:
        torch.save(torch.nn.Linear(hidden, colbert_dim).state_dict(), dest / "colbert_linear.pt")
    return dest


@pytest.fixture(scope="session")
def tiny_bge_m3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bge_m3(tmp_path_factory.mktemp("models") / "tiny-bge-m3")


def save_splade(dest: Path, pooling: str = "max", activation: str = "relu", seed: int = 7,
                prompts: dict[str, str] | None = None) -> Path:
    """A SPLADE folder as sentence-transformers saves a SparseEncoder: a tiny random
    BertForMaskedLM (fill-mask Transformer) followed by SpladePooling, with query/document prompts."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    raw = dest.parent / f"{dest.name}-mlm"
    raw.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).eval().save_pretrained(raw)
    copy_tokenizer(raw, 128)
    encoder = SparseEncoder(modules=[Transformer(str(raw), transformer_task="fill-mask"),
                                     SpladePooling(pooling, activation_function=activation)],
                            prompts=prompts if prompts is not None else {"query": "query: ", "document": "passage: "},
                            device="cpu")
    encoder.save(str(dest))
    shutil.rmtree(raw)
    return dest


@pytest.fixture(scope="session")
def tiny_splade_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_splade(tmp_path_factory.mktemp("models") / "tiny-splade")


def save_image_text(dest: Path, family: str = "clip", seed: int = 8, image_size: int = 32) -> Path:
    """A tiny random CLIPModel or SiglipModel folder with its processor config (as save_pretrained of
    the processor writes it) and the bundled tokenizer (texts up to 64 tokens, [SEP] as CLIP's eos)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    if family == "clip":
        model: Any = CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": 102, "bos_token_id": 101,
                                                       "pad_token_id": 0},
                                          vision_config=vision, projection_dim=24))
        processor: Any = CLIPImageProcessor(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    else:
        model = SiglipModel(SiglipConfig(text_config={**text, "pad_token_id": 0}, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    model.eval().save_pretrained(dest)
    processor.save_pretrained(dest)
    copy_tokenizer(dest, 64)
    return dest


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A random RGB image of the given size, encoded."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
