"""Rerankers that are decoders (Qwen3-Reranker style): a causal LM asked "yes" or "no".

A (query, document) pair becomes one prompt, and the score is read at its last position:
``logit("yes") - logit("no")``. Its sigmoid is ``softmax([no, yes])[yes]``, which is exactly what
Qwen3-Reranker's model card computes (``log_softmax`` over the two logits, then ``exp``), and the
raw value is sentence-transformers' ``LogitScore`` (true minus false logit). So these models go
through the same rerank heads, routes, CLI and Parquet columns as the cross-encoders.

The prompt is ``head + body + tail``: ``head`` and ``tail`` are tokenized on their own and kept
whole, ``body`` (instruction, query, document) is truncated from its end when the whole would be
longer than the model's maximum, so a long document loses its end but never the question that
asks for the answer. Where the template comes from, in order:

1. the model's files, the sentence-transformers >= 5.4 way: a ``LogitScore`` module
   (``modules.json``; its ``config.json`` names the true/false token ids) and a chat template
   (``chat_template.jinja`` or ``tokenizer_config.json``) that renders messages with the roles
   ``query`` and ``document`` (and ``system`` for the instruction). It is rendered by
   transformers' own chat-template renderer; what follows the document is the tail.
2. for ``model_type: qwen3`` without such files, the documented default below: Qwen3-Reranker's
   own format from its model card (system prompt, ``<Instruct>/<Query>/<Document>``, and the
   assistant turn with an empty think block), tokens "yes"/"no".

A causal LM folder is taken for a reranker when its sentence-transformers files say so (a
``LogitScore`` module), or, without them, when its name says so (``...Reranker...``) and it has
no pooling module (an embedder such as Qwen3-Embedding has one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from producer.errors import UnsupportedModel

log = logging.getLogger(__name__)

FAMILY = "decoder-reranker"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: Qwen3-Reranker's prompt, from its model card (the documented default)
QWEN3_HEAD = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
              "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
              "<|im_start|>user\n")
QWEN3_TAIL = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
_LOGIT_SCORE = "LogitScore"
_QUERY_MARK, _DOCUMENT_MARK = "\x00EMBEDFLEET-QUERY\x00", "\x00EMBEDFLEET-DOCUMENT\x00"


@dataclass(frozen=True)
class PairTemplate:
    """How a pair becomes one prompt for a decoder reranker (see the module's docstring)."""

    source: str
    head: str
    tail: str
    true_token: str
    false_token: str | None
    true_id: int | None = None
    false_id: int | None = None
    #: a chat template with query/document roles (rendered per instruction), or None: Qwen3's format
    chat_template: str | None = None
    #: the instruction when none is given (None: the chat template's own default)
    instruction: str | None = DEFAULT_INSTRUCTION

    def body(self, query: str, document: str, instruction: str | None = None) -> str:
        """The truncatable middle of the prompt for one pair."""
        before, between = self._parts(instruction if instruction is not None else self.instruction)
        return before + query + between + document

    def _parts(self, instruction: str | None) -> tuple[str, str]:
        if self.chat_template is None:
            return f"<Instruct>: {instruction}\n<Query>: ", "\n<Document>: "
        before, between, _ = _render_parts(self.chat_template, instruction)
        return before, between

    def describe(self) -> str:
        answer = f'"{self.true_token}" vs "{self.false_token}"' if self.false_token else f'"{self.true_token}"'
        return f"{self.source}; scored by {answer} at the last position"


def _render(chat_template: str, instruction: str | None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "query", "content": _QUERY_MARK}, {"role": "document", "content": _DOCUMENT_MARK}]
    if instruction is not None:
        messages.insert(0, {"role": "system", "content": instruction})
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template,
                                        add_generation_prompt=True)
    return rendered[0]


@lru_cache(maxsize=64)
def _render_parts(chat_template: str, instruction: str | None) -> tuple[str, str, str]:
    """The text before the query, between query and document, and after the document."""
    text = _render(chat_template, instruction)
    if text.count(_QUERY_MARK) != 1 or text.count(_DOCUMENT_MARK) != 1 or text.index(_QUERY_MARK) > text.index(_DOCUMENT_MARK):
        raise UnsupportedModel("its chat template does not place one query before one document")
    before, rest = text.split(_QUERY_MARK)
    between, after = rest.split(_DOCUMENT_MARK)
    return before, between, after


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = (_read_json(path / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _pair_chat_template(path: Path) -> str | None:
    """The folder's chat template if it renders a query and a document (else None)."""
    template = _chat_template(path)
    if not template or "query" not in template or "document" not in template:
        return None
    try:
        _render_parts(template, None)
    except Exception as exc:  # a template that cannot render a pair is not a pair template
        log.info("the chat template at %s does not render a query/document pair: %s", path, exc)
        return None
    return template


def is_reranker(config: dict[str, Any], modules: list[dict[str, Any]], name: str) -> bool:
    """Whether a model folder is a decoder reranker (see the module's docstring)."""
    architecture = (config.get("architectures") or [""])[0]
    if not architecture.endswith("ForCausalLM"):
        return False
    types = [str(m.get("type", "")) for m in modules]
    if any(t.endswith(_LOGIT_SCORE) for t in types):
        return True
    return not any(t.endswith("Pooling") for t in types) and "rerank" in name.lower()


def read_template(path: Path, config: dict[str, Any], modules: list[dict[str, Any]]) -> PairTemplate | None:
    """The pair template from the folder's files, else Qwen3-Reranker's default for qwen3; None: none."""
    folder = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(_LOGIT_SCORE)), None)
    score = (_read_json(path / folder / "config.json") if folder else None) or {}
    true_id, false_id = score.get("true_token_id"), score.get("false_token_id")
    template = _pair_chat_template(path)
    if template is not None:
        _, _, tail = _render_parts(template, None)
        return PairTemplate(source="the model's chat template (query/document roles)", head="", tail=tail,
                            true_token="yes", false_token="no" if folder is None or false_id is not None else None,
                            true_id=true_id, false_id=false_id, chat_template=template, instruction=None)
    if config.get("model_type") == "qwen3":
        return PairTemplate(source="Qwen3-Reranker's format (documented default)", head=QWEN3_HEAD, tail=QWEN3_TAIL,
                            true_token="yes", false_token="no" if folder is None or false_id is not None else None,
                            true_id=true_id, false_id=false_id)
    return None


def answer_ids(path: Path, template: PairTemplate) -> tuple[int, int | None]:
    """The token ids scored: from the LogitScore config, else the tokenizer's "yes"/"no" tokens."""
    from tokenizers import Tokenizer

    true_id, false_id = template.true_id, template.false_id
    if true_id is None or (false_id is None and template.false_token is not None):
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        true_id = true_id if true_id is not None else tokenizer.token_to_id(template.true_token)
        if template.false_token is not None and false_id is None:
            false_id = tokenizer.token_to_id(template.false_token)
        if true_id is None or (template.false_token is not None and false_id is None):
            raise UnsupportedModel(f"its tokenizer has no single token for {template.true_token!r} / "
                                   f"{template.false_token!r}, which the score is read from")
    return int(true_id), None if false_id is None else int(false_id)


@dataclass
class ScoreOutput:
    """What the torch backend reads of a scoring model's output (as transformers names it)."""

    logits: torch.Tensor


class DecoderScorer(nn.Module):
    """A causal LM's base model plus the two rows of its LM head that the score needs.

    Only ``[batch, hidden]`` at each input's last real token meets those rows (in fp32), so the
    vocabulary-wide projection is never computed and an untied LM head is not kept at all.
    Inputs are right-padded; the last real position is ``attention_mask.sum() - 1``.
    """

    def __init__(self, causal_lm: nn.Module, true_id: int, false_id: int | None) -> None:
        super().__init__()
        self.base = causal_lm.base_model
        self.config = causal_lm.config
        head = causal_lm.get_output_embeddings().weight
        ids = [true_id] + ([false_id] if false_id is not None else [])
        rows = head.detach()[ids].float()
        self.register_buffer("rows", rows if false_id is None else (rows[:1] - rows[1:]))

    def _apply(self, fn: Any, recurse: bool = True) -> "DecoderScorer":
        """Moving the model to a device moves the rows; a dtype change never rounds them."""
        rows = self.rows
        super()._apply(fn, recurse)
        self.rows = rows.to(self.rows.device, torch.float32)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ScoreOutput:
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        with torch.autocast(final.device.type, enabled=False):
            return ScoreOutput(logits=final.float() @ self.rows.T)
