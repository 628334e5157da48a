"""Rerank and classify heads on the newer encoders, and prompts from the model's files.

Like the BERT heads in ``test_engine.py``: tiny random sequence-classification models (1 label: a
reranker, 3 labels: a classifier) of ModernBERT, XLM-R and DeBERTa-v2 against transformers
itself, through the engine's padded batches. Then the prompts: ``default_prompt_name`` applies
when a job names none, ``prompt_name`` maps onto the model's prompts with an error listing them,
and a cross-encoder's prompt goes before the query as sentence-transformers puts it.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from producer.jobs import JobKind, Options

from tests.conftest import _copy_tokenizer
from tests.fixtures_extra import EDGE_TEXTS, make_engine, sample_texts

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _modernbert(n_labels: int) -> Any:
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    config = ModernBertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=256, local_attention=16,
                              pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
                              num_labels=n_labels, classifier_pooling="mean")
    return ModernBertForSequenceClassification(config)


def _xlmr(n_labels: int) -> Any:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    config = XLMRobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=0, bos_token_id=101,
                              eos_token_id=102, type_vocab_size=1, num_labels=n_labels)
    return XLMRobertaForSequenceClassification(config)


def _deberta_v2(n_labels: int) -> Any:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=64,
                             type_vocab_size=0, pad_token_id=0, num_labels=n_labels)
    return DebertaV2ForSequenceClassification(config)


def _bert(n_labels: int) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=128, num_labels=n_labels))


BUILDERS: dict[str, Callable[[int], Any]] = {"modernbert": _modernbert, "xlm-roberta": _xlmr, "deberta-v2": _deberta_v2,
                                             "bert": _bert}


def save_classifier(root: Path, family: str, n_labels: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = BUILDERS[family](n_labels).eval()
    if n_labels > 1:
        model.config.id2label = dict(LABELS)
        model.config.label2id = {v: k for k, v in LABELS.items()}
    with torch.no_grad():  # spread the tiny random head so scores differ between inputs
        for name, param in model.named_parameters():
            if "classifier" in name or "score" in name or name.startswith("head"):
                param.normal_(0, 1.0)
    dest = root / f"tiny-{family}-{n_labels}"
    model.save_pretrained(str(dest))
    _copy_tokenizer(dest)
    if family == "xlm-roberta":  # as XLM-R's own tokenizer: <s> A </s></s> B </s>, every type id 0
        _roberta_pairs(dest)
    return dest


def _roberta_pairs(folder: Path) -> None:
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.post_processor = processors.RobertaProcessing(("[SEP]", 102), ("[CLS]", 101))
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json as it is (BERT's class rebuilds its own)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@torch.inference_mode()
def transformers_logits(folder: Path, first: list[str], second: list[str] | None, max_length: int) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if model.config.model_type == "xlm-roberta":  # XLM-R's own tokenizer returns no token type ids
        enc.pop("token_type_ids", None)
    accepted = set(inspect.signature(model.forward).parameters)
    return model(**{k: v for k, v in enc.items() if k in accepted}).logits.numpy()


FAMILIES = ["modernbert", "xlm-roberta", "deberta-v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_reranker_matches_transformers(tmp_path: Path, family: str) -> None:
    folder = save_classifier(tmp_path, family, 1, seed=21)
    engine = make_engine(folder)
    try:
        assert engine.info.kind == JobKind.rerank and engine.info.model_type == family
        queries = ["what is a generator?", "how do I open a file", "x"]
        docs = sample_texts(10, step=401) + [EDGE_TEXTS[5]]
        pairs = [(queries[i % 3], d) for i, d in enumerate(docs)]
        logits = transformers_logits(folder, [q for q, _ in pairs], [d for _, d in pairs], engine.info.max_length)[:, 0]
        raw = engine.run(pairs, Options(raw_scores=True), timeout=120)
        scores = engine.run(pairs, timeout=120)
        assert not raw.errors and not scores.errors
        np.testing.assert_allclose(raw.values, logits, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(scores.values, 1 / (1 + np.exp(-logits)), rtol=1e-4, atol=1e-6)
        assert np.std(logits) > 1e-3
    finally:
        engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_matches_transformers(tmp_path: Path, family: str) -> None:
    folder = save_classifier(tmp_path, family, 3, seed=22)
    engine = make_engine(folder)
    try:
        info = engine.info
        assert info.kind == JobKind.classify and info.labels == ("negative", "neutral", "positive")
        texts = sample_texts(14, step=173) + EDGE_TEXTS
        logits = transformers_logits(folder, texts, None, info.max_length)
        result = engine.run(texts, timeout=120)
        assert not result.errors
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        np.testing.assert_allclose(result.values, probs, rtol=1e-4, atol=1e-6)
        raw = engine.run(texts, Options(raw_scores=True), timeout=120).values
        np.testing.assert_allclose(raw, logits, rtol=1e-4, atol=2e-5)
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory: pytest.TempPathFactory, tiny_embed_model: Path) -> Path:
    """The tiny BERT embedder with sentence-transformers prompts and a default prompt name."""
    folder = tmp_path_factory.mktemp("models") / "tiny-bert-default-prompt"
    shutil.copytree(tiny_embed_model, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "query: ", "document": "document: ", "classification": "classify this: "},
        "default_prompt_name": "document"}))
    return folder


def test_the_default_prompt_applies_when_none_is_named(prompted_model: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(prompted_model), device="cpu")
    texts = sample_texts(8, step=233)
    engine = make_engine(prompted_model)
    try:
        assert engine.info.default_prompt_name == "document"
        for options, kwargs in ((Options(), {}), (Options(prompt_name="query"), {"prompt_name": "query"}),
                                (Options(prompt_name="classification"), {"prompt_name": "classification"}),
                                (Options(prompt=""), {"prompt": ""})):
            got = engine.run(texts, options, timeout=60).values
            want = st.encode(texts, convert_to_numpy=True, **kwargs)
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() > 0.99999, f"{options}: {cos.min()}"
        plain = engine.run(texts, Options(prompt=""), timeout=60).values
        default = engine.run(texts, timeout=60).values
        assert (np.abs(plain - default).max(axis=1) > 1e-4).all(), "the default prompt made no difference"
        with pytest.raises(ValueError, match=r"prompt_name 'passage' is not defined by the model "
                                             r"\(it has: classification, document, query\)"):
            engine.submit(texts, Options(prompt_name="passage"))
        ids = engine.run([[2023, 2003, 1037, 3231]], timeout=60)
        assert "default prompt ('document') cannot be put before token ids" in ids.errors[0]
        assert not engine.run([[2023, 2003, 1037, 3231]], Options(prompt=""), timeout=60).errors
    finally:
        engine.stop()


def test_a_cross_encoders_prompt_goes_before_the_query(tmp_path: Path) -> None:
    folder = save_classifier(tmp_path, "bert", 1, seed=23)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"web": "web search: "}}))
    engine = make_engine(folder)
    try:
        docs = sample_texts(5, step=61)
        pairs = [("open a file", d) for d in docs]
        got = engine.run(pairs, Options(prompt_name="web", raw_scores=True), timeout=60).values
        want = transformers_logits(folder, ["web search: open a file"] * len(docs), docs, engine.info.max_length)[:, 0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
        plain = engine.run(pairs, Options(raw_scores=True), timeout=60).values
        assert np.abs(plain - got).max() > 1e-3, "the prompt made no difference to the scores"
    finally:
        engine.stop()
