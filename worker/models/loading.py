"""Load a model faithfully, or refuse it with the reason: the loading step every backend goes through.

A model is served only when every parameter its architecture needs came from its files and no
tensor in its files went unused, beyond the known-harmless ones listed in ``HARMLESS`` (and a
native family's own list) with the reason each is harmless. transformers' ``from_pretrained(...,
output_loading_info=True)`` reports what it initialized at random (missing), what it dropped
(unexpected) and what it re-initialized for a shape mismatch; the native families report the
same three lists. Before any weight is read, the config is checked for what the class would
silently ignore:

* ``auto_map`` (code outside transformers): refused unless a native family implements that
  code, the folder runs with ``trust_remote_code`` (``--trust-remote-code``), or transformers
  ships a port of it under the config's ``model_type`` and class name (NomicBERT) and reads every
  key of the config;
* a ``position_embedding_type`` other than absolute that the config class does not declare
  (transformers 5's BERT, RoBERTa and XLM-R have none, so ``alibi`` or ``relative_key`` would be
  dropped without a word).

Every refusal is ``producer.errors.UnsupportedModel``: permanent, so a shard that meets it is
failed with the reason at once instead of being retried.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from producer.errors import BadInput, UnsupportedModel
from producer.jobs import JobKind
from worker.models import checkpoint, jina_bert, qwen3_reranker, splade
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: the families embedfleet implements itself, and what each serves (named in refusals)
NATIVE_FAMILIES = {
    jina_bert.FAMILY: "jina-embeddings-v2-* (JinaBERT: ALiBi, GLU feed-forward; the code and multilingual variants)",
    qwen3_reranker.FAMILY: "decoder rerankers such as Qwen3-Reranker (a causal LM's yes/no logits)",
}
GENERIC = ("everything else runs on transformers' own classes (BERT, RoBERTa, XLM-R, ModernBERT, DeBERTa-v2, "
           "NomicBERT, Qwen3, ...)")


@dataclass(frozen=True)
class Harmless:
    """Tensors a faithful load may lack (``missing``) or leave unused (``unused``), and why."""

    pattern: str
    where: str
    reason: str
    kinds: tuple[JobKind, ...] = (JobKind.embed, JobKind.rerank, JobKind.classify)

    def matches(self, name: str, where: str, kind: JobKind) -> bool:
        return where == self.where and kind in self.kinds and re.search(self.pattern, name) is not None


HARMLESS = (
    Harmless(r"(^|\.)position_ids$", "unused", "a buffer older checkpoints saved; transformers recomputes it"),
    Harmless(r"(^|\.)pooler\.", "missing", "the pooler feeds only classification heads; embeddings pool the "
             "token states", (JobKind.embed,)),
    Harmless(r"(^|\.)pooler\.", "unused", "the pooler feeds only classification heads; embeddings pool the "
             "token states", (JobKind.embed,)),
    Harmless(r"^(cls|lm_head|head|decoder|generator_lm_head)\.", "unused",
             "a masked- or causal-LM head of the checkpoint's task class; embeddings do not use it", (JobKind.embed,)),
)
#: config keys every config may carry without changing the maths (bookkeeping, defaults of other tools)
_BOOKKEEPING_KEYS = {
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "gradient_checkpointing", "model_max_length", "_attn_implementation_autoset", "attn_implementation",
    "tie_word_embeddings", "classifier_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "cls_token_id", "id2label", "label2id", "num_labels", "problem_type", "initializer_range", "layer_norm_eps",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "is_decoder", "add_cross_attention", "return_dict",
}


# ---------------------------------------------------------------------------- the report
@dataclass
class LoadReport:
    """What a load found; ``problems`` empty means faithful."""

    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: harmless tensors, by reason
    allowed: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def judge(cls, kind: JobKind, missing: Iterable[str], unused: Iterable[str],
              mismatched: Iterable[tuple[str, Any, Any]] = (), errors: Iterable[str] = (),
              harmless: Iterable[Harmless] = HARMLESS) -> "LoadReport":
        report = cls(mismatched=[(str(n), tuple(a), tuple(b)) for n, a, b in mismatched], errors=list(errors))
        rules = list(harmless)
        for where, names, keep in (("missing", missing, report.missing), ("unused", unused, report.unused)):
            for name in sorted(set(names)):
                rule = next((r for r in rules if r.matches(name, where, kind)), None)
                if rule is None:
                    keep.append(name)
                else:
                    report.allowed.setdefault(rule.reason, []).append(name)
        return report

    @property
    def faithful(self) -> bool:
        return not (self.missing or self.unused or self.mismatched or self.errors)

    def problems(self) -> list[str]:
        found = []
        if self.missing:
            found.append(f"{len(self.missing)} tensor(s) the architecture needs are not in its files (they would be "
                         f"randomly initialized): {_names(self.missing)}")
        if self.unused:
            found.append(f"{len(self.unused)} tensor(s) in its files would go unused: {_names(self.unused)}")
        if self.mismatched:
            shown = ", ".join(f"{n} (file {list(a)}, model {list(b)})" for n, a, b in self.mismatched[:5])
            found.append(f"{len(self.mismatched)} tensor(s) have the wrong shape: {shown}")
        found += self.errors
        return found


def _names(names: list[str], shown: int = 8) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _where(info: ModelInfo) -> str:
    return f"model {info.name!r} ({info.architecture}, model_type {info.model_type!r})"


def refuse(info: ModelInfo, reason: str, what_to_do: str = "") -> UnsupportedModel:
    """The refusal for ``info``: what is wrong, what to do, and which families are native."""
    natives = "; ".join(f"{name}: {what}" for name, what in NATIVE_FAMILIES.items())
    advice = f" {what_to_do}" if what_to_do else ""
    return UnsupportedModel(f"{_where(info)} cannot be served faithfully: {reason}.{advice} Native families: "
                            f"{natives}; {GENERIC}.", param="model")


def verify(info: ModelInfo, report: LoadReport) -> None:
    """Raise the refusal when ``report`` is not faithful; log what was allowed and why."""
    for reason, names in report.allowed.items():
        log.info("%s: %d tensor(s) not used or not in the files, harmless: %s (%s)", info.name, len(names),
                 _names(names, 3), reason)
    if not report.faithful:
        raise refuse(info, "; ".join(report.problems()),
                     "Check that the folder holds the weights of this architecture (a complete, unmodified "
                     "checkpoint).")


# ---------------------------------------------------------------------------- the config
def _config(info: ModelInfo) -> dict[str, Any]:
    path = info.path / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _config_class(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None


def _declared_keys(config_class: Any) -> set[str]:
    fields = set(getattr(config_class, "__dataclass_fields__", {}))
    return fields | set(getattr(config_class, "attribute_map", {}) or {})


def _upstreamed(info: ModelInfo, config: dict[str, Any]) -> bool:
    """Whether transformers ships the auto_map's code itself: same model_type, same class name."""
    from transformers.models.auto import modeling_auto

    table = (modeling_auto.MODEL_MAPPING_NAMES if info.kind == JobKind.embed
             else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    auto_key = "AutoModel" if info.kind == JobKind.embed else "AutoModelForSequenceClassification"
    wanted = str((config.get("auto_map") or {}).get(auto_key, "")).rsplit(".", 1)[-1]
    return bool(wanted) and table.get(info.model_type) == wanted


def check_config(info: ModelInfo) -> None:
    """Refuse, before any weight is read, a config whose class would ignore what it asks for."""
    if info.default_prompt_name and info.default_prompt_name not in info.prompts:
        raise refuse(info, f"its default_prompt_name {info.default_prompt_name!r} is not one of its prompts "
                     f"({', '.join(sorted(info.prompts)) or 'none'})")
    if info.family in NATIVE_FAMILIES:
        _check_native(info)
        return
    if info.family == "remote-code":
        return
    config, config_class = _config(info), _config_class(info.model_type)
    if info.remote_code:
        _check_auto_map(info, config, config_class)
    if config_class is None:
        raise refuse(info, f"transformers has no class for model_type {info.model_type!r}")
    position = config.get("position_embedding_type")
    if position not in (None, "absolute") and "position_embedding_type" not in _declared_keys(config_class):
        raise refuse(info, f"its config asks for position_embedding_type={position!r}, which transformers' "
                     f"{config_class.__name__.removesuffix('Config')} classes ignore (they have absolute positions "
                     "only)")


def _check_native(info: ModelInfo) -> None:
    """What a native family does not implement: JinaBERT heads, a decoder reranker without a template."""
    if info.family == jina_bert.FAMILY and info.kind != JobKind.embed:
        raise refuse(info, f"JinaBERT is native for embeddings; {info.architecture} (a {info.kind.value} head) "
                     "is not implemented")
    if info.family == qwen3_reranker.FAMILY and info.pair_template is None:
        raise refuse(info, "it is a causal LM taken for a reranker, but it has no prompt template: neither a "
                     "chat template with query/document roles in its files nor a documented default for "
                     f"model_type {info.model_type!r}", "Add the template (sentence-transformers' "
                     "LogitScore module and chat template), or serve a Qwen3 reranker.")


def _check_auto_map(info: ModelInfo, config: dict[str, Any], config_class: Any) -> None:
    """``auto_map`` code runs natively only where transformers ships it, reading every config key."""
    if config_class is None or not _upstreamed(info, config):
        instead = (f"transformers has no class for model_type {info.model_type!r}" if config_class is None else
                   f"transformers' own {info.model_type!r} class, which it would use instead, is not that code")
        raise refuse(info, f"its config asks for code that is not in transformers or embedfleet (auto_map: "
                     f"{', '.join(info.remote_code)}), and {instead}",
                     "If the folder ships that code and you trust it, pass --trust-remote-code "
                     "(EMBEDFLEET_TRUST_REMOTE_CODE=1).")
    ignored = sorted(set(config) - _declared_keys(config_class) - _BOOKKEEPING_KEYS)
    if ignored:
        raise refuse(info, f"transformers' port of its auto_map code ({config_class.__name__}) does not read "
                     f"these keys of its config: {', '.join(ignored)}", "Convert the config to the port's "
                     "names, or pass --trust-remote-code if the folder ships its own code.")


def transformers_only(info: ModelInfo, backend: str, remote_code: bool = True) -> None:
    """For backends that compile transformers' own classes (onnx, neuron): refuse what the config
    check refuses, and the native families, whose maths those exporters do not know."""
    check_config(info)
    if "image" in info.modalities:
        raise BadInput(f"--backend {backend} exports text encoders; model {info.name!r} is an image-text model "
                       f"({info.family}), which runs on the torch backend: use --backend torch", param="backend")
    if info.family == splade.FAMILY:
        raise BadInput(f"--backend {backend} exports the encoder's hidden states; model {info.name!r} is a SPLADE "
                       "sparse encoder (it pools its masked-LM logits), which runs on the torch backend: use "
                       "--backend torch", param="backend")
    if info.family in NATIVE_FAMILIES or (info.family == "remote-code" and not remote_code):
        raise BadInput(f"--backend {backend} compiles transformers' own classes; model {info.name!r} is "
                       f"{NATIVE_FAMILIES.get(info.family, 'run by its own code')}, which runs on the torch backend: "
                       "use --backend torch", param="backend")


# ---------------------------------------------------------------------------- loading
def load_model(info: ModelInfo, dtype: torch.dtype, attention: str = "sdpa") -> torch.nn.Module:
    """The model of ``info`` on the CPU in ``dtype``, every weight from its files, or a refusal.

    Returns a module whose ``forward`` takes transformers' arguments and whose output has
    ``last_hidden_state`` (embed) or ``logits`` (rerank, classify). ``attention`` is passed to
    transformers' classes (the ONNX export wants ``eager``).
    """
    model, report = _load(info, dtype, attention)
    verify(info, report)
    return model.eval()


def _load(info: ModelInfo, dtype: torch.dtype, attention: str) -> tuple[torch.nn.Module, LoadReport]:
    """The model and what its load found (``verify`` judges it)."""
    check_config(info)
    if info.family == jina_bert.FAMILY:
        return _load_jina(info, dtype)
    if info.family == qwen3_reranker.FAMILY:
        return _load_decoder_reranker(info, dtype, attention)
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if info.family == splade.FAMILY:  # SPLADE pools the masked-LM head's logits
        loader: Any = AutoModelForMaskedLM
    else:
        loader = AutoModel if info.kind == JobKind.embed else AutoModelForSequenceClassification
    model, loading = _from_pretrained(info, loader, dtype, attention)
    return model, _report(info.kind, loading)


def _from_pretrained(info: ModelInfo, loader: Any, dtype: torch.dtype, attention: str) -> tuple[Any, dict[str, Any]]:
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if info.family == "remote-code":
        kwargs["trust_remote_code"] = True  # the folder's own code picks its attention
        try:
            return loader.from_pretrained(str(info.path), **kwargs)  # type: ignore[no-any-return]
        except (ImportError, OSError, ValueError, AttributeError) as exc:
            raise refuse(info, f"its own code (auto_map: {', '.join(info.remote_code)}) could not be loaded "
                         f"here: {type(exc).__name__}: {exc}", "The code must be in the folder (or in the "
                         "local Hugging Face cache when HF_HUB_OFFLINE is set).") from exc
    # "sdpa" is transformers' default, which falls back to eager for classes without it (DeBERTa-v2);
    # asking for it by name would refuse those classes instead
    kwargs["attn_implementation"] = None if attention == "sdpa" else attention
    return loader.from_pretrained(str(info.path), **kwargs)  # type: ignore[no-any-return]


def _report(kind: JobKind, loading: dict[str, Any], harmless: Iterable[Harmless] = HARMLESS) -> LoadReport:
    mismatched = [(str(m[0]), m[1], m[2]) if isinstance(m, (tuple, list)) else (str(m), (), ())
                  for m in loading.get("mismatched_keys") or ()]
    return LoadReport.judge(kind, loading.get("missing_keys") or (), loading.get("unexpected_keys") or (),
                            mismatched, [str(e) for e in loading.get("error_msgs") or ()], harmless)


def _load_jina(info: ModelInfo, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadReport]:
    config = _config(info)
    tensors = checkpoint.load_tensors(info.path)
    try:
        model, missing, unused, mismatched = jina_bert.build(config, tensors, dtype)
    except UnsupportedModel as exc:
        raise refuse(info, str(exc)) from None
    harmless = [Harmless(pattern, "unused", reason) for pattern, reason in jina_bert.HARMLESS_UNUSED]
    log.info("%s: %s", info.name, model.config.variant)
    return model, LoadReport.judge(info.kind, missing, unused, mismatched, harmless=harmless)


def _load_decoder_reranker(info: ModelInfo, dtype: torch.dtype, attention: str) -> tuple[torch.nn.Module, LoadReport]:
    from transformers import AutoModelForCausalLM

    assert info.pair_template is not None  # check_config refused it otherwise
    try:
        true_id, false_id = qwen3_reranker.answer_ids(info.path, info.pair_template)
    except UnsupportedModel as exc:
        raise refuse(info, str(exc)) from None
    model, loading = _from_pretrained(info, AutoModelForCausalLM, dtype, attention)
    report = _report(info.kind, loading)
    if not report.faithful:  # judged before the LM head is cut down to its two rows
        return model, report
    scorer = qwen3_reranker.DecoderScorer(model, true_id, false_id)
    del model
    return scorer, report


# ---------------------------------------------------------------------------- inspection
@dataclass
class Verdict:
    """Whether a folder loads faithfully, and why not (for ``embedfleet models`` and ``/v1/models``)."""

    faithful: bool
    reason: str = ""
    allowed: dict[str, list[str]] = field(default_factory=dict)


def inspect_loading(info: ModelInfo) -> Verdict:
    """Load the model on the CPU (in its saved precision where that is bf16/fp16) and judge it."""
    try:
        model, report = _load(info, _saved_dtype(info), "sdpa")
        del model
        verify(info, report)
    except UnsupportedModel as exc:
        return Verdict(False, str(exc))
    return Verdict(True, allowed=report.allowed)


def _saved_dtype(info: ModelInfo) -> torch.dtype:
    """The checkpoint's own precision, so inspecting a large model costs no fp32 copy."""
    config = _config(info)
    saved = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(saved, torch.float32)
