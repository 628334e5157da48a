"""The model families of issue #14 through the CLI: ``run``, ``models``, ``plan`` + ``shard``.

* a jina-embeddings-v2 folder runs natively and writes the engine's vectors;
* a decoder reranker (Qwen3-Reranker style) writes scores from the same rerank columns;
* the two refusals (code the project does not implement; a tensor missing from the files) are
  one-line errors with exit 2 naming what is wrong and what to do, and ``shard`` fails its shard
  with the reason (a failed marker at the first attempt, not a retry);
* ``--trust-remote-code`` runs a folder that ships its own code, end to end;
* ``embedfleet models`` says what a folder is and whether it loads faithfully.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from producer import storage
from producer.jobs import Options

from tests.families import save_jina, save_qwen3_causal_lm, save_remote_code_model, tiny_jina_model  # noqa: F401
from tests.fixtures_extra import make_engine, sample_texts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cli():  # type: ignore[no-untyped-def]
    """``embedfleet ARGS`` in this process: (exit code, output with whitespace collapsed, raw stdout)."""
    from producer.cli import console
    from worker.cli import app

    runner = CliRunner()
    saved = console._width
    console.width = 1000

    def invoke(*args: Any) -> tuple[int, str, str]:
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, " ".join(result.output.split()), result.stdout

    yield invoke
    console._width = saved


def read_parts(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def refused_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The issue's two silently-wrong folders: code on the hub that nobody implements, a missing tensor."""
    from transformers import BertConfig, BertModel

    from tests.families import copy_tokenizer

    root = tmp_path_factory.mktemp("refused")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(root / "remote-code"))
    data = json.loads((root / "remote-code" / "config.json").read_text())
    data["auto_map"] = {"AutoConfig": "someorg/fancy-bert--configuration.FancyConfig",
                        "AutoModel": "someorg/fancy-bert--modeling.FancyModel"}
    (root / "remote-code" / "config.json").write_text(json.dumps(data))
    copy_tokenizer(root / "remote-code", 128)
    missing = save_jina(root / "missing-tensor", drop=["encoder.layer.0.attention.self.key.weight"])
    return {"remote-code": root / "remote-code", "missing-tensor": missing}


def corpus(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": sample_texts(n, step=53)}), path)
    return path


# ---------------------------------------------------------------------------- served
def test_run_on_a_jina_v2_folder_writes_the_engines_vectors(cli, tmp_path: Path, tiny_jina_model: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    source = corpus(tmp_path)
    code, output, _ = cli("run", source, "--out", tmp_path / "out", "--model", tiny_jina_model, "--device", "cpu",
                          "--id-column", "id")
    assert code == 0, output
    table = read_parts(tmp_path / "out")
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    texts = sample_texts(12, step=53)
    engine = make_engine(tiny_jina_model)
    try:
        want = engine.run([texts[i] for i in table.column("id").to_pylist()], timeout=60).values
    finally:
        engine.stop()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_run_reranks_with_a_decoder_reranker(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = save_qwen3_causal_lm(tmp_path / "tiny-qwen3-reranker", sample_texts(300, step=5), max_length=256)
    docs = sample_texts(8, step=77)
    pairs = [("what is python", d) for d in docs]
    source = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [q for q, _ in pairs], "document": docs}), source)
    code, output, _ = cli("run", source, "--out", tmp_path / "out", "--model", folder, "--device", "cpu")
    assert code == 0, output
    scores = np.array(read_parts(tmp_path / "out").column("score").to_pylist(), dtype=np.float32)
    engine = make_engine(folder)
    try:
        want = engine.run(pairs, Options(), timeout=60).values
    finally:
        engine.stop()
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    assert ((scores > 0) & (scores < 1)).all()


# ---------------------------------------------------------------------------- refused
@pytest.mark.parametrize("name,expected", [
    ("remote-code", ["someorg/fancy-bert--modeling.FancyModel", "--trust-remote-code", "Native families",
                     "jina-embeddings-v2"]),
    ("missing-tensor", ["encoder.layer.0.attention.self.key.weight", "randomly initialized"]),
])
def test_run_refuses_an_unfaithful_folder(cli, tmp_path: Path, refused_folders: dict[str, Path], name: str,  # type: ignore[no-untyped-def]
                                          expected: list[str]) -> None:
    code, output, _ = cli("run", corpus(tmp_path), "--out", tmp_path / "out", "--model", refused_folders[name],
                          "--device", "cpu")
    assert code == 2, output
    assert "cannot be served faithfully" in output
    for text in expected:
        assert text in output, output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_shard_fails_its_shard_with_the_reason(cli, tmp_path: Path, refused_folders: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "job"
    code, output, _ = cli("plan", corpus(tmp_path), "--out", out, "--model", refused_folders["missing-tensor"],
                          "--shard-rows", "6")
    assert code == 0, output
    code, output, _ = cli("shard", "--job-manifest", out, "--index", "0", "--device", "cpu")
    assert code == 1, output
    assert "shard 0 failed" in output and "encoder.layer.0.attention.self.key.weight" in output
    marker = storage.read_marker(str(out), 0)
    assert marker is not None and marker.status == "failed" and marker.deliveries == 1
    assert "UnsupportedModel" in (marker.failure or "") and "randomly initialized" in (marker.failure or "")
    # a retry of the child (AWS Batch attempts) finds the marker and loads nothing
    code, output, _ = cli("shard", "--job-manifest", out, "--index", "0", "--device", "cpu")
    assert code == 1 and "already done" in output


# ---------------------------------------------------------------------------- --trust-remote-code
def test_trust_remote_code_runs_a_folder_that_ships_its_code(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModel, AutoTokenizer

    folder = save_remote_code_model(tmp_path / "ships-its-code")
    source = corpus(tmp_path, n=6)
    code, output, _ = cli("run", source, "--out", tmp_path / "refused", "--model", folder, "--device", "cpu")
    assert code == 2 and "--trust-remote-code" in output, output
    code, output, _ = cli("run", source, "--out", tmp_path / "out", "--model", folder, "--device", "cpu",
                          "--trust-remote-code", "--id-column", "id")
    assert code == 0, output
    got = np.array(read_parts(tmp_path / "out").column("embedding").to_pylist(), dtype=np.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    texts = sample_texts(6, step=53)
    with torch.inference_mode():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    code, output, stdout = cli("models", folder, "--trust-remote-code", "--json")
    assert code == 0 and json.loads(stdout)["family"] == "remote-code", output


def test_trust_remote_code_through_the_setting_for_shard(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Array-job children read EMBEDFLEET_TRUST_REMOTE_CODE, as AWS Batch passes settings."""
    folder = save_remote_code_model(tmp_path / "ships-its-code")
    out = tmp_path / "job"
    code, output, _ = cli("plan", corpus(tmp_path, n=6), "--out", out, "--model", folder, "--id-column", "id")
    assert code == 0, output
    monkeypatch.setenv("EMBEDFLEET_TRUST_REMOTE_CODE", "1")
    code, output, _ = cli("shard", "--job-manifest", out, "--index", "0", "--device", "cpu")
    assert code == 0, output
    assert len(read_parts(out)) == 6 and (out / "_manifest.json").is_file()


# ---------------------------------------------------------------------------- embedfleet models
def test_models_says_what_a_folder_is(cli, tiny_jina_model: Path, refused_folders: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    code, output, stdout = cli("models", tiny_jina_model, "--json")
    assert code == 0, output
    facts = json.loads(stdout)
    assert facts["family"] == "jina-bert-v2" and facts["kind"] == "embed" and facts["faithful"] is True
    assert (facts["pooling"], facts["dimensions"], facts["max_length"]) == ("mean", 32, 8192)
    assert any("pooler" in reason for reason in facts["harmless"])
    code, output, _ = cli("models", tiny_jina_model)
    assert code == 0 and "loads faithfully" in output and "jina-bert-v2" in output
    code, output, stdout = cli("models", refused_folders["missing-tensor"], refused_folders["remote-code"], "--json")
    assert code == 2
    both = json.loads(stdout)
    assert [entry["faithful"] for entry in both] == [False, False]
    assert "encoder.layer.0.attention.self.key.weight" in both[0]["reason"]
    assert "--trust-remote-code" in both[1]["reason"]
    code, output, _ = cli("models", refused_folders["remote-code"], "--no-load")
    assert code == 2 and "refused" in output


def test_models_lists_prompts_and_the_default(cli, tmp_path: Path, tiny_embed_model: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "with-default-prompt"
    shutil.copytree(tiny_embed_model, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "passage"}))
    code, output, _ = cli("models", folder)
    assert code == 0, output
    assert "passage (default): 'passage: '" in output and "query: 'query: '" in output
