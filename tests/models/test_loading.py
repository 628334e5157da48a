"""Load faithfully or refuse: what transformers 5 reports, judged; configs whose class ignores them.

Real folders saved by transformers, then altered the way real folders go wrong: a tensor
missing, one of the wrong shape, a head the architecture needs absent, ``auto_map`` code, an
ignored position embedding type. Each refusal is ``UnsupportedModel`` naming what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from producer.errors import BadInput, UnsupportedModel
from producer.jobs import JobKind
from worker.models.loading import check_config, inspect_loading, load_model, transformers_only
from worker.models.resolve import describe

from tests.families import copy_tokenizer, save_jina, write_st_files

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def _save(model: Any, dest: Path) -> Path:
    model.save_pretrained(str(dest))
    copy_tokenizer(dest, 128)
    return dest


def _edit_config(folder: Path, **changes: Any) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _drop_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _replace_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_the_bundled_model_loads_faithfully(bundled_model: Path) -> None:
    verdict = inspect_loading(describe(None))
    assert verdict.faithful, verdict.reason


def test_a_bert_missing_a_tensor_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = _save(BertModel(BertConfig(**TINY)), tmp_path / "bert")
    _drop_tensor(folder, "encoder.layer.1.attention.self.query.weight")
    with pytest.raises(UnsupportedModel, match=r"randomly initialized\): encoder\.layer\.1\.attention\.self\.query\.weight"):
        load_model(describe(str(folder)), torch.float32)


def test_a_tensor_of_the_wrong_shape_is_refused_with_both_shapes(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = _save(BertModel(BertConfig(**TINY)), tmp_path / "bert")
    _replace_tensor(folder, "encoder.layer.0.attention.self.key.weight", torch.zeros(16, 32))
    with pytest.raises(UnsupportedModel, match=r"wrong shape: encoder\.layer\.0\.attention\.self\.key\.weight "
                                               r"\(file \[16, 32\], model \[32, 32\]\)"):
        load_model(describe(str(folder)), torch.float32)


def test_a_masked_lm_checkpoint_embeds_faithfully_its_head_and_pooler_allowed(tmp_path: Path) -> None:
    """The MLM head goes unused and the pooler is absent: both harmless for embeddings, and said why."""
    from transformers import BertConfig, BertForMaskedLM

    folder = _save(BertForMaskedLM(BertConfig(**TINY)), tmp_path / "bert-mlm")
    info = describe(str(folder))
    assert info.kind == JobKind.embed
    verdict = inspect_loading(info)
    assert verdict.faithful, verdict.reason
    allowed = {name for names in verdict.allowed.values() for name in names}
    assert any(n.startswith("cls.predictions") for n in allowed) and any(n.startswith("pooler.") for n in allowed)


def test_a_classifier_without_its_head_is_refused(tmp_path: Path) -> None:
    """A base checkpoint under a ForSequenceClassification config: the classifier and the pooler it
    reads would be random, so nothing about it is harmless."""
    from transformers import BertConfig, BertModel

    folder = _save(BertModel(BertConfig(**TINY), add_pooling_layer=False), tmp_path / "headless")
    _edit_config(folder, architectures=["BertForSequenceClassification"], num_labels=3,
                 id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    info = describe(str(folder))
    assert info.kind == JobKind.classify
    with pytest.raises(UnsupportedModel) as caught:
        load_model(info, torch.float32)
    assert "classifier.weight" in str(caught.value) and "bert.pooler.dense.weight" in str(caught.value)


def test_an_ignored_position_embedding_type_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = _edit_config(_save(BertModel(BertConfig(**TINY)), tmp_path / "relative"),
                          position_embedding_type="relative_key_query")
    with pytest.raises(UnsupportedModel, match=r"position_embedding_type='relative_key_query'.*Bert classes ignore"):
        check_config(describe(str(folder)))


def test_alibi_on_a_bert_config_is_jinabert_not_bert(tmp_path: Path) -> None:
    """The issue's case: what transformers would have loaded as plain BERT is JinaBERT here."""
    folder = save_jina(tmp_path / "jina")
    info = describe(str(folder))
    assert info.family == "jina-bert-v2"
    assert load_model(info, torch.float32).__class__.__name__ == "JinaBertModel"


def test_auto_map_code_nobody_implements_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = _save(XLMRobertaModel(XLMRobertaConfig(**TINY)), tmp_path / "xlmr-lora")
    _edit_config(folder, auto_map={"AutoConfig": "jinaai/xlm-roberta-flash-implementation--configuration_xlm_roberta.XLMRobertaFlashConfig",
                                   "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"})
    with pytest.raises(UnsupportedModel) as caught:
        check_config(describe(str(folder)))
    message = str(caught.value)
    for text in ("XLMRobertaLoRA", "--trust-remote-code", "EMBEDFLEET_TRUST_REMOTE_CODE", "Native families",
                 "jina-embeddings-v2", "Qwen3-Reranker", "xlm-roberta"):
        assert text in message, message


def _nomic(tmp_path: Path, **config: Any) -> Path:
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(0)
    model = NomicBertModel(NomicBertConfig(vocab_size=30528, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64))
    folder = _save(model, tmp_path / "nomic")
    return _edit_config(folder, auto_map={"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                                          "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
                        **config)


def test_auto_map_code_that_transformers_ships_is_served(tmp_path: Path) -> None:
    """NomicBERT's hub code is in transformers 5 under the same model_type and class name."""
    info = describe(str(_nomic(tmp_path)))
    assert info.remote_code and info.family == "transformers"
    assert inspect_loading(info).faithful


def test_config_keys_the_port_does_not_read_are_refused(tmp_path: Path) -> None:
    """The remote code's own config names (nomic's n_embd, rotary_emb_base) would be ignored by the port."""
    info = describe(str(_nomic(tmp_path, n_embd=32, rotary_emb_base=10000)))
    with pytest.raises(UnsupportedModel, match=r"does not read these keys of its config: n_embd, rotary_emb_base"):
        check_config(info)


def test_a_default_prompt_the_model_does_not_define_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = _save(BertModel(BertConfig(**TINY)), tmp_path / "bert")
    write_st_files(folder, "mean", 128, 32, prompts={"query": "q: "}, default_prompt_name="document")
    with pytest.raises(UnsupportedModel, match=r"default_prompt_name 'document' is not one of its prompts \(query\)"):
        check_config(describe(str(folder)))


def test_backends_that_compile_transformers_classes_refuse_native_families(tmp_path: Path) -> None:
    info = describe(str(save_jina(tmp_path / "jina")))
    with pytest.raises(BadInput, match=r"--backend onnx compiles transformers' own classes.*use --backend torch"):
        transformers_only(info, "onnx")


def test_unsupported_model_is_permanent() -> None:
    """A shard that meets a refusal is failed at once (no retry can load what is not there)."""
    assert UnsupportedModel.permanent is True


def test_a_jinabert_classifier_is_refused_not_loaded_as_bert(tmp_path: Path) -> None:
    """jina-reranker-v1 (JinaBertForSequenceClassification): JinaBERT is native for embeddings only."""
    folder = _edit_config(save_jina(tmp_path / "jina-reranker-v1"), architectures=["JinaBertForSequenceClassification"],
                          num_labels=1)
    info = describe(str(folder))
    assert info.family == "jina-bert-v2" and info.kind == JobKind.rerank
    with pytest.raises(UnsupportedModel, match=r"JinaBERT is native for embeddings; JinaBertForSequenceClassification"):
        check_config(info)
