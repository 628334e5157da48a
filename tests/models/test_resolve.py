"""Model resolution: the bundled default, local folders, the kind, pooling, prompts and labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from producer.jobs import JobKind
from worker.models.resolve import DEFAULT_MODEL, ModelNotFound, describe, fingerprint, locate_model


@pytest.mark.parametrize("ref", [None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "default"])
def test_bundled_default_aliases(ref: str | None, bundled_model: Path) -> None:
    info = describe(ref)
    assert info.path == bundled_model.resolve() or info.path == bundled_model
    assert info.name == DEFAULT_MODEL
    assert (info.kind, info.pooling, info.normalize, info.max_length, info.dims) == (JobKind.embed, "mean", True, 256, 384)
    assert len(info.revision) == 16


def test_tiny_embed_model_reads_sentence_transformers_files(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))
    assert info.kind == JobKind.embed and info.architecture == "BertModel"
    assert (info.pooling, info.normalize, info.max_length, info.dims) == ("cls", True, 64, 32)
    assert info.prompts == {"query": "query: ", "passage": "passage: "}
    assert info.name == "tiny-bert"


def test_tiny_xlmr_without_st_files_means_mean_normalized(tiny_xlmr_model: Path) -> None:
    info = describe(str(tiny_xlmr_model))
    assert (info.kind, info.pooling, info.normalize, info.model_type) == (JobKind.embed, "mean", True, "xlm-roberta")
    # XLM-R positions start after padding_idx (0 here): 130 positions hold 129 tokens.
    assert info.max_length == 129
    assert info.prompts == {}


def test_rerank_and_classify_kinds(tiny_rerank_model: Path, tiny_classify_model: Path) -> None:
    rerank = describe(str(tiny_rerank_model))
    assert rerank.kind == JobKind.rerank and rerank.dims == 1 and len(rerank.labels) == 1
    classify = describe(str(tiny_classify_model))
    assert classify.kind == JobKind.classify
    assert classify.labels == ("negative", "neutral", "positive") and classify.dims == 3
    assert classify.multi_label is False


def test_unknown_model_names_the_reference() -> None:
    with pytest.raises(ModelNotFound, match="no-such-org/no-such-model"):
        describe("no-such-org/no-such-model")


def test_missing_local_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="not a directory"):
        locate_model(str(tmp_path / "absent"))


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no config.json"):
        describe(str(tmp_path))


def test_two_pooling_modes_are_refused(tiny_embed_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "two-poolings"
    shutil.copytree(tiny_embed_model, folder)
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config["pooling_mode_mean_tokens"] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFound, match="exactly one mode"):
        describe(str(folder))


def test_fingerprint_is_stable_and_changes_with_content(tiny_embed_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_embed_model, folder)
    assert fingerprint(folder) == fingerprint(tiny_embed_model)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"q": "q: "}}))
    assert fingerprint(folder) != fingerprint(tiny_embed_model)
    assert describe(str(folder)).revision == fingerprint(folder)
