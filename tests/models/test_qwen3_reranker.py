"""Decoder rerankers (Qwen3-Reranker style) against plain transformers on a tiny random Qwen3ForCausalLM.

The reference is the model card's own recipe, written here: the prompt's prefix, the truncated
``<Instruct>/<Query>/<Document>`` body and the suffix tokenized separately, one pair at a time,
``AutoModelForCausalLM`` logits at the last position, ``log_softmax`` over [no, yes]. The
engine runs the same pairs in padded batches through the rerank head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.jobs import JobKind, Options
from worker.models.resolve import describe

from tests.families import save_qwen3_causal_lm
from tests.fixtures_extra import make_engine, sample_texts

#: from Qwen3-Reranker's model card
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: a sentence-transformers >= 5.4 style chat template: messages with query and document roles
PAIR_CHAT_TEMPLATE = (
    "<|im_start|>system\nJudge the Document for the Query.<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ messages | selectattr('role', 'eq', 'system') | map(attribute='content') | first "
    "| default('Find the passage that answers') }}\n"
    "<Query>: {{ messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first }}\n"
    "<Document>: {{ messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first }}"
    "<|im_end|>\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUERIES = ["what is a generator in python", "how to open a file", "capital of france", "x"]


def training_texts() -> list[str]:
    return sample_texts(600, step=7) + [CARD_PREFIX, CARD_SUFFIX, CARD_INSTRUCTION, "<Instruct>: <Query>: <Document>:"]


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen3_causal_lm(tmp_path_factory.mktemp("models") / "tiny-Qwen3-Reranker", training_texts(),
                                max_length=256)


def _hf(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)), AutoModelForCausalLM.from_pretrained(str(folder),
                                                                                             dtype=torch.float32).eval()


@torch.inference_mode()
def card_scores(folder: Path, pairs: list[tuple[str, str]], max_length: int,
                instruction: str = CARD_INSTRUCTION) -> tuple[np.ndarray, list[list[int]]]:
    """The model card's recipe, pair by pair: (raw yes-minus-no logits, token ids)."""
    tokenizer, model = _hf(folder)
    prefix = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    raw, all_ids = [], []
    for query, document in pairs:
        body = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        ids = tokenizer(body, truncation="longest_first", max_length=max_length - len(prefix) - len(suffix),
                        add_special_tokens=False)["input_ids"]
        full = prefix + ids + suffix
        logits = model(torch.tensor([full])).logits[0, -1]
        pair = torch.log_softmax(torch.stack([logits[no], logits[yes]]), dim=0)
        raw.append(float(pair[1] - pair[0]))  # log P(yes) - log P(no) == logit(yes) - logit(no)
        all_ids.append(full)
    return np.array(raw, dtype=np.float64), all_ids


def pairs_with_a_long_document() -> list[tuple[str, str]]:
    docs = sample_texts(10, step=301) + [" ".join(sample_texts(60, step=11))]
    return [(QUERIES[i % len(QUERIES)], d) for i, d in enumerate(docs)]


def test_described_as_a_decoder_reranker(reranker_folder: Path) -> None:
    info = describe(str(reranker_folder))
    assert (info.kind, info.family, info.dims, info.max_length) == (JobKind.rerank, "decoder-reranker", 1, 256)
    assert info.pair_template is not None and "Qwen3-Reranker" in info.pair_template.source


def test_scores_match_the_model_cards_recipe(reranker_folder: Path) -> None:
    engine = make_engine(reranker_folder, max_batch_tokens=2048)
    try:
        pairs = pairs_with_a_long_document()
        want, ids = card_scores(reranker_folder, pairs, engine.info.max_length)
        assert len(ids[-1]) == engine.info.max_length, "the long document must be truncated"
        encoded = engine.tokenizer.encode([engine._pair(q, d, None) for q, d in pairs])
        assert [e.ids.tolist() for e in encoded] == ids, "the prompt's tokens differ from the model card's"
        raw = engine.run(pairs, Options(raw_scores=True), timeout=120)
        scores = engine.run(pairs, timeout=120)
        assert not raw.errors and not scores.errors
        np.testing.assert_allclose(raw.values, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores.values, 1 / (1 + np.exp(-want)), rtol=1e-4, atol=1e-5)
        assert np.std(want) > 0.05, "the tiny model's scores should differ between pairs"
        assert scores.truncated[-1] and scores.n_tokens[-1] == engine.info.max_length
    finally:
        engine.stop()


def test_a_prompt_is_the_instruction(reranker_folder: Path) -> None:
    engine = make_engine(reranker_folder)
    try:
        pairs = pairs_with_a_long_document()[:4]
        instruction = "Given a question, find the passage that answers it"
        want, _ = card_scores(reranker_folder, pairs, engine.info.max_length, instruction=instruction)
        got = engine.run(pairs, Options(prompt=instruction, raw_scores=True), timeout=60).values
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        engine.stop()


def test_an_untied_lm_head(tmp_path: Path) -> None:
    folder = save_qwen3_causal_lm(tmp_path / "tiny-qwen3-reranker-untied", training_texts(), tie=False, seed=9,
                                  max_length=256)
    engine = make_engine(folder)
    try:
        pairs = pairs_with_a_long_document()[:5]
        want, _ = card_scores(folder, pairs, engine.info.max_length)
        np.testing.assert_allclose(engine.run(pairs, Options(raw_scores=True), timeout=60).values, want,
                                   rtol=1e-4, atol=1e-4)
    finally:
        engine.stop()


def test_the_template_from_the_models_files(reranker_folder: Path, tmp_path: Path) -> None:
    """sentence-transformers >= 5.4 files: a LogitScore module and a chat template with query and
    document roles; the reference renders it with transformers' apply_chat_template."""
    folder = tmp_path / "st-style-reranker"
    shutil.copytree(reranker_folder, folder)
    (folder / "chat_template.jinja").write_text(PAIR_CHAT_TEMPLATE)
    tokenizer, model = _hf(folder)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore", "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"}]))
    (folder / "1_LogitScore").mkdir()
    (folder / "1_LogitScore" / "config.json").write_text(json.dumps({"true_token_id": yes, "false_token_id": no}))
    info = describe(str(folder))
    assert info.kind == JobKind.rerank and info.pair_template is not None and info.pair_template.chat_template
    pairs = [(QUERIES[i % 4], d) for i, d in enumerate(sample_texts(6, step=211))]
    want = []
    with torch.inference_mode():
        for query, document in pairs:
            messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0, -1]
            want.append(float(logits[yes] - logits[no]))
    engine = make_engine(folder)
    try:
        got = engine.run(pairs, Options(raw_scores=True), timeout=60).values
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        engine.stop()


def test_a_causal_lm_without_rerank_evidence_stays_an_embedder(reranker_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-qwen3-base"
    shutil.copytree(reranker_folder, folder)
    info = describe(str(folder))
    assert info.kind == JobKind.embed and info.family == "transformers"
