"""The thin HTTP facade: OpenAI / infinity / Cohere-shaped routes that enqueue and wait.

It holds no model. Each request becomes one inline job on the model's queue; concurrent
requests land in the same worker engine, so their texts share batches there. The facade learns
what is served by asking the workers (a broadcast control command, or the ``embedfleet.info``
task where the transport has no broadcast) in a background thread, so no request waits for it.

Everything a client can get wrong is answered with an OpenAI-shaped error body before anything
reaches a worker: 400 bad input, 401 bad key, 404 unknown model, 413 too large, 429 overloaded,
503 no worker, 504 timed out. A bad request never costs another request anything.
"""

from __future__ import annotations

import base64
import gc
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Literal, Union

import anyio
import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.broker import INFO_TASK, MODELS_COMMAND, declare_queue
from producer.client import Client
from producer.http.coalesce import Answer
from producer.http.dispatch import Dispatcher
from producer.http.errors import ApiError, bad, error_response, too_large, unavailable
from producer.jobs import (
    INLINE_SUFFIX,
    MAX_INLINE_INPUTS,
    MAX_INPUT_CHARS,
    ClassifyJob,
    EmbedJob,
    JobKind,
    Options,
    RerankJob,
    inline_queue_name,
    model_slug,
)
from producer.http.metrics import CONTENT_TYPE, FacadeMetrics, WorkerSample

log = logging.getLogger(__name__)

#: The broadcast command workers answer with their hosted models (registered in worker/info.py).
KINDS = {kind.value for kind in JobKind}
#: How often the directory thread counts queued messages (the 429 backpressure reads the count).
DEPTH_EVERY_S = 0.5
API_PATHS = ("/embeddings", "/rerank", "/classify", "/models")
KNOWN_PATHS = {prefix + path for prefix in ("", "/v1") for path in API_PATHS} | {"/health", "/metrics"}


# ---------------------------------------------------------------------------------- settings
@dataclass
class FacadeSettings:
    """Limits and behaviour of one facade; the defaults suit a single small worker."""

    models: list[str] = field(default_factory=list)
    """Models this facade serves (``ref`` or ``kind:ref``); empty: whatever workers answer."""
    api_key: str | None = None
    timeout_s: float = 30.0
    max_inflight: int = 256
    max_queue_depth: int = 1024
    max_inputs: int = MAX_INLINE_INPUTS
    max_chars: int = MAX_INPUT_CHARS
    max_body_bytes: int = 8 * 1024 * 1024
    jobs_per_worker: int = 4
    """Jobs in flight per worker and model; past it, concurrent requests wait and leave merged."""
    refresh_s: float = 5.0
    discovery_timeout_s: float = 0.5
    discovery: Literal["auto", "broadcast", "task"] = "auto"


# ---------------------------------------------------------------------------------- wire shapes
#: Documented bounds (the configured limits may be lower; those are checked per request -> 413).
Text = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request (infinity and LangChain send the same)."""

    input: Union[Text, list[Text], TokenIds, list[TokenIds]] = Field(
        description="A text, a list of texts, or token ids (one array, or one array per input)")
    model: StrictStr | None = Field(default=None, description="Served model id; optional when one is served")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1, description="Keep the first N dimensions, renormalized")
    user: StrictStr | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class DocumentObject(_Request):
    text: Text


class RerankRequest(_Request):
    """Cohere / Jina / infinity rerank request."""

    query: Text
    documents: list[Union[Text, DocumentObject]] = Field(min_length=1)
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of sigmoid scores")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentObject | None = None


class RerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResult]
    usage: Usage


class ClassifyRequest(_Request):
    """infinity's classify request."""

    input: Union[Text, list[Text]]
    model: StrictStr | None = None
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of probabilities")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    object: Literal["classify"] = "classify"
    model: str
    data: list[list[LabelScore]]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "embedfleet"
    created: int
    kind: str
    capabilities: list[str]
    dimensions: int
    max_length: int
    labels: list[str]
    backend: str
    device: str
    dtype: str
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in ((400, "Bad input"), (401, "Missing or wrong API key"), (404, "Unknown model"),
                         (413, "Too large"), (429, "Overloaded"), (503, "No worker answers"), (504, "Timed out"))
}


# ---------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class ServedModel:
    """A model some worker answered for, merged over the workers that host it."""

    id: str
    ref: str
    kind: str
    queue: str
    inline_queue: str
    dimensions: int
    max_length: int
    labels: tuple[str, ...]
    backend: str
    device: str
    dtype: str
    token_ids: bool
    workers: tuple[str, ...]
    stats: dict[str, int]

    def names(self) -> set[str]:
        return {self.id, self.ref, model_slug(self.id), model_slug(self.ref)}


def parse_wanted(entry: str) -> tuple[str | None, str]:
    """``kind:ref`` or ``ref``; a Windows drive letter is not a kind."""
    head, sep, tail = entry.partition(":")
    if sep and head in KINDS and tail:
        return head, tail
    return None, entry


def merge_answers(answers: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, ServedModel]:
    """Per queue: one entry, listing every worker that serves it and their summed batch stats."""
    merged: dict[str, ServedModel] = {}
    for worker, models in answers:
        for d in models:
            queue = str(d["queue"])
            stats = {k: int(v) for k, v in (d.get("stats") or {}).items()}
            previous = merged.get(queue)
            if previous is not None:
                stats = {k: stats.get(k, 0) + previous.stats.get(k, 0) for k in set(stats) | set(previous.stats)}
            workers = (previous.workers if previous else ()) + (worker,)
            merged[queue] = ServedModel(
                id=str(d["id"]), ref=str(d.get("ref") or d["id"]), kind=str(d["kind"]), queue=queue,
                inline_queue=str(d.get("inline_queue") or queue + INLINE_SUFFIX),
                dimensions=int(d["dimensions"]), max_length=int(d["max_length"]), labels=tuple(d.get("labels") or ()),
                backend=str(d["backend"]), device=str(d["device"]), dtype=str(d["dtype"]),
                token_ids=bool(d.get("token_ids", False)), workers=workers, stats=stats,
            )
    return merged


class Directory:
    """What is served, refreshed in the background; requests read the last answer and never wait."""

    def __init__(self, app: Any, settings: FacadeSettings) -> None:
        self.app = app
        self.settings = settings
        self.wanted = [parse_wanted(entry) for entry in settings.models]
        self.models: dict[str, ServedModel] = {}
        self.depths: dict[str, int] = {}
        self.refreshed_at = 0.0
        self.first = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._use_broadcast = settings.discovery != "task"
        self._created = int(time.time())

    # -- asking the workers
    def _broadcast(self) -> bool:
        mode = self.settings.discovery
        if mode != "auto":
            return mode == "broadcast"
        with self.app.connection_for_read() as conn:
            return bool(conn.transport.implements.exchange_type & {"fanout"})

    def ask(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """One round of answers: ``(worker, [model descriptions])``."""
        timeout = self.settings.discovery_timeout_s
        if self._use_broadcast:
            replies = self.app.control.broadcast(MODELS_COMMAND, reply=True, timeout=timeout) or []
            return [(worker, answer.get("models", [])) for reply in replies for worker, answer in reply.items()
                    if isinstance(answer, dict)]
        answers = []
        for kind, ref in self.wanted:  # no broadcast (SQS): ask on each wanted model's queue
            queue = inline_queue_name(kind or JobKind.embed.value, ref)
            declare_queue(self.app, queue)
            result = self.app.send_task(INFO_TASK, queue=queue, expires=max(timeout * 4, 5.0))
            try:
                answers.append((f"worker@{queue}", result.get(timeout=timeout, disable_sync_subtasks=False)))
            except Exception:  # no worker answered in time: the model is simply not served now
                pass
            finally:
                result.forget()
        return answers

    def queue_depths(self, queues: list[str]) -> dict[str, int]:
        """Messages waiting per queue (LLEN on Redis, qsize in memory, SQS's approximate count).

        Uses one connection kept by the directory thread; a queue that cannot be counted is left out.
        """
        if self._conn is None:
            self._conn = self.app.connection_for_read()
        channel = self._conn.default_channel
        size = getattr(channel, "_size", None)
        if size is None:  # not a kombu virtual transport: depth unknown
            return {}
        depths: dict[str, int] = {}
        for queue in queues:
            try:
                depths[queue] = int(size(queue))
            except Exception as exc:
                log.debug("cannot count queue %s: %s", queue, exc)
        return depths

    def depths_of(self, queue: str) -> int | None:
        """The last count of messages waiting in ``queue`` (``None``: not known)."""
        return self.depths.get(queue)

    def sample_depths(self) -> None:
        try:
            self.depths = self.queue_depths(sorted({q for m in self.models.values() for q in (m.queue, m.inline_queue)}))
        except Exception as exc:  # a broker hiccup: drop the connection, try again next round
            log.debug("queue depths unavailable: %s", exc)
            self.depths = {}
            self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
            self._conn = None

    def refresh(self) -> None:
        try:
            models = merge_answers(self.ask())
        except Exception as exc:  # a broker hiccup: keep serving what we knew, say so in the log
            log.warning("could not ask the workers what they serve: %s", exc)
            return
        self.models = models
        self.refreshed_at = time.monotonic()
        self.first.set()

    # -- lifecycle
    def start(self) -> None:
        self._use_broadcast = self._broadcast()
        self._thread = threading.Thread(target=self._loop, name="ef-facade-directory", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """Models every ``refresh_s``; queue depths (for backpressure) every ``DEPTH_EVERY_S``."""
        next_models = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_models:
                    self.refresh()
                    next_models = time.monotonic() + self.settings.refresh_s
                self.sample_depths()
                self._stop.wait(DEPTH_EVERY_S)
        finally:
            self._close_conn()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.discovery_timeout_s + 2)

    # -- lookups
    def fresh(self) -> bool:
        return self.first.is_set() and time.monotonic() - self.refreshed_at < 3 * self.settings.refresh_s + 5

    def served(self) -> list[ServedModel]:
        """Served models, restricted to the wanted ones when the facade was given a list."""
        models = list(self.models.values())
        if not self.wanted:
            return models
        return [m for m in models if any(self._matches(m, kind, ref) for kind, ref in self.wanted)]

    @staticmethod
    def _matches(model: ServedModel, kind: str | None, name: str) -> bool:
        return (kind is None or kind == model.kind) and bool(model.names() & {name, model_slug(name)})

    def resolve(self, name: str | None, kind: JobKind, route: str) -> ServedModel:
        """The served model a request names; errors say what is served instead."""
        served = self.served()
        if name is None:
            of_kind = [m for m in served if m.kind == kind.value]
            if len(of_kind) == 1:
                return of_kind[0]
            if not of_kind:
                raise ApiError(404, f"no {kind.value} model is served here", "invalid_request_error", "model",
                               "model_not_found")
            listed = ", ".join(sorted(m.id for m in of_kind)) or "none"
            raise bad(f"model: required when this server does not serve exactly one {kind.value} model "
                       f"(served: {listed})", "model")
        matches = [m for m in served if self._matches(m, None, name)]
        exact = [m for m in matches if m.kind == kind.value]
        if exact:
            return exact[0]
        if matches:
            raise bad(f"model {name!r} is a {matches[0].kind} model; {route} needs a {kind.value} model", "model",
                       "wrong_model_kind")
        if any(ref == name or model_slug(ref) == model_slug(name) for _, ref in self.wanted):
            raise unavailable(f"no worker for model {name!r} answers right now; retry later", "no_worker", "model",
                              int(self.settings.refresh_s) + 1)
        listed = ", ".join(sorted(m.id for m in served)) or "none"
        raise ApiError(404, f"model {name!r} is not served here (served: {listed})", "invalid_request_error",
                       "model", "model_not_found")

    def card(self, model: ServedModel) -> ModelCard:
        return ModelCard(id=model.id, created=self._created, kind=model.kind, capabilities=[model.kind],
                         dimensions=model.dimensions, max_length=model.max_length, labels=list(model.labels),
                         backend=model.backend, device=model.device, dtype=model.dtype, workers=len(model.workers))

    def samples(self) -> list[WorkerSample]:
        return [WorkerSample(model=m.id, kind=m.kind, queue=m.queue, workers=len(m.workers),
                             queue_depth=self.depths.get(m.queue), inline_queue=m.inline_queue,
                             inline_queue_depth=self.depths.get(m.inline_queue), batches=m.stats.get("batches", 0),
                             items=m.stats.get("items", 0), tokens=m.stats.get("tokens", 0),
                             padded_tokens=m.stats.get("padded_tokens", 0))
                for m in self.served()]


# ---------------------------------------------------------------------------------- input checks
def check_texts(texts: list[str], settings: FacadeSettings, param: str) -> None:
    """Bounds and emptiness, checked here so junk never reaches a worker."""
    if not texts:
        raise bad(f"{param}: the list is empty; give at least one input", param)
    if len(texts) > settings.max_inputs:
        raise too_large(f"{param}: {len(texts)} inputs exceed the limit of {settings.max_inputs} per request", param)
    for index, text in enumerate(texts):
        if len(text) > settings.max_chars:
            raise too_large(f"{param}[{index}]: {len(text)} characters exceed the limit of {settings.max_chars}",
                             f"{param}[{index}]")
        if not text.strip():
            raise bad(f"{param}[{index}]: empty text; give at least one non-whitespace character", f"{param}[{index}]")


def embedding_inputs(value: Any, model: ServedModel, settings: FacadeSettings) -> list[Any]:
    """Texts as a list; token-id arrays only where the worker's engine takes ids."""
    if isinstance(value, str):
        texts = [value]
    elif value and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif not value:
        raise bad("input: the list is empty; give at least one input", "input")
    else:
        return _token_inputs(value, model, settings)
    check_texts(texts, settings, "input")
    return texts


def _token_inputs(value: list[Any], model: ServedModel, settings: FacadeSettings) -> list[list[int]]:
    arrays = [value] if isinstance(value[0], int) else value
    if not model.token_ids:
        raise bad(f"input: token-id inputs are not supported yet by the workers serving {model.id!r}; "
                   "send texts", "input", "token_ids_unsupported")
    if len(arrays) > settings.max_inputs:
        raise too_large(f"input: {len(arrays)} inputs exceed the limit of {settings.max_inputs}", "input")
    for index, ids in enumerate(arrays):
        if not ids:
            raise bad(f"input[{index}]: empty token array", f"input[{index}]")
        if len(ids) > model.max_length:
            raise bad(f"input[{index}]: {len(ids)} tokens exceed the model's maximum of {model.max_length}",
                       f"input[{index}]")
        if min(ids) < 0:
            raise bad(f"input[{index}]: token ids must be >= 0", f"input[{index}]")
    return [list(ids) for ids in arrays]


def per_item_errors(result: Answer, param: str) -> None:
    """The worker rejected some inputs: the whole request is a 400 naming them (OpenAI's way)."""
    if result.errors:
        shown = "; ".join(f"{param}[{i}]: {msg}" for i, msg in list(sorted(result.errors.items()))[:5])
        more = f" (and {len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
        first = min(result.errors)
        raise bad(f"{len(result.errors)} input(s) rejected: {shown}{more}", f"{param}[{first}]")


def _usage(result: Answer) -> dict[str, int]:
    tokens = int(sum(result.n_tokens))
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _rows(vectors: np.ndarray, encoding: str) -> list[Any]:
    """float32 rows (orjson writes each value's shortest exact float32 form), or base64 of them."""
    if encoding == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    return list(np.ascontiguousarray(vectors, dtype=np.float32))


def json_response(body: Any, status_code: int = 200) -> Response:
    """JSON through orjson: numpy rows are written directly, ~30x faster than ``json.dumps``."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status_code,
                    media_type="application/json")


# ---------------------------------------------------------------------------------- the app
class _BodyLimit:
    """413 for bodies over the limit, by header and while reading (chunked bodies too)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                response = error_response(self._error())
                await response(scope, receive, send)
                return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited, send)

    def _error(self) -> ApiError:
        return too_large(f"the request body exceeds the limit of {self.limit} bytes")


class _Observe:
    """Requests and latency per route and status (plain ASGI: no per-request task or body copy)."""

    def __init__(self, app: Any, metrics: FacadeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = scope.get("path", "")
            route = path if path in KNOWN_PATHS else "other"  # bounded label values
            self.metrics.observe(route, status, time.perf_counter() - started)


class Facade:
    """State shared by the routes of one app."""

    def __init__(self, client: Client, settings: FacadeSettings) -> None:
        self.client = client
        self.settings = settings
        self.directory = Directory(client.app, settings)
        self.metrics = FacadeMetrics(self.directory.samples)
        self.dispatcher = Dispatcher(client.app, settings.timeout_s, settings.max_inflight, settings.max_queue_depth,
                                     settings.jobs_per_worker, self.directory.depths_of, self.metrics)

    async def authorize(self, request: Request) -> None:
        """The bearer key check (async: FastAPI would run a plain function on a worker thread)."""
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    # -- routes
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.embed, "/v1/embeddings")
        inputs = embedding_inputs(body.input, model, self.settings)
        if body.dimensions is not None and body.dimensions > model.dimensions:
            raise bad(f"dimensions: {body.dimensions} is over the model's {model.dimensions} dimensions", "dimensions")
        job = EmbedJob(model=model.id, inputs=inputs, options=Options(dimensions=body.dimensions))
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, "input")
        vectors = result.values
        self._count(model, result)
        data = [{"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(_rows(vectors, body.encoding_format))]
        return json_response({"object": "list", "data": data, "model": body.model or model.id, "usage": _usage(result)})

    async def rerank(self, body: RerankRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.rerank, "/v1/rerank")
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        check_texts(documents, self.settings, "documents")
        check_texts([body.query], self.settings, "query")
        job = RerankJob(model=model.id, query=body.query, documents=documents, options=Options(raw_scores=body.raw_scores))
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, "documents")
        scores = result.values[:, 0]
        self._count(model, result)
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))[: body.top_n]
        results = [{"index": i, "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
        return json_response({"object": "rerank", "model": body.model or model.id, "results": results,
                             "usage": _usage(result)})

    async def classify(self, body: ClassifyRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.classify, "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        check_texts(texts, self.settings, "input")
        job = ClassifyJob(model=model.id, inputs=texts, options=Options(raw_scores=body.raw_scores))
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, "input")
        probs = result.values
        self._count(model, result)
        data = [sorted(({"label": label, "score": float(p)} for label, p in zip(result.labels, row)),
                       key=lambda item: -item["score"]) for row in probs]
        return json_response({"object": "classify", "model": body.model or model.id, "data": data,
                             "usage": _usage(result)})

    def list_models(self) -> Response:
        cards = [self.directory.card(m).model_dump() for m in sorted(self.directory.served(), key=lambda m: m.id)]
        return json_response({"object": "list", "data": cards})

    def health(self) -> Response:
        served = self.directory.served()
        missing = [ref for kind, ref in self.directory.wanted
                   if not any(self.directory._matches(m, kind, ref) for m in served)]
        ready = self.directory.fresh() and bool(served) and not missing
        body = {"status": "ready" if ready else "not ready", "unix": time.time(),
                "models": {m.id: {"kind": m.kind, "workers": len(m.workers)} for m in served}, "missing": missing}
        return json_response(body, 200 if ready else 503)

    def _count(self, model: ServedModel, result: Answer) -> None:
        self.metrics.tokens.labels(model.id, model.kind).inc(int(sum(result.n_tokens)))
        self.metrics.inputs.labels(model.kind).observe(len(result.n_tokens))


def _router(facade: Facade, in_schema: bool) -> APIRouter:
    """The API routes; mounted at ``/v1`` and at the root (infinity and LangChain call ``/embeddings``)."""
    router = APIRouter(dependencies=[Depends(facade.authorize)], responses=ERRORS)

    @router.post("/embeddings", response_model=EmbeddingResponse, include_in_schema=in_schema,
                 summary="Embed texts (OpenAI-compatible)")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await facade.embeddings(body)

    @router.post("/rerank", response_model=RerankResponse, include_in_schema=in_schema,
                 summary="Rerank documents against a query (Cohere/Jina shape)")
    async def rerank(body: RerankRequest) -> Response:
        return await facade.rerank(body)

    @router.post("/classify", response_model=ClassifyResponse, include_in_schema=in_schema,
                 summary="Classify texts (infinity shape)")
    async def classify(body: ClassifyRequest) -> Response:
        return await facade.classify(body)

    @router.get("/models", response_model=ModelList, include_in_schema=in_schema, summary="Served models")
    async def models() -> Response:
        return facade.list_models()

    return router


#: What a union-typed field accepts, said once instead of one error per union branch.
FIELD_HINTS = {
    "input": "input must be a string, a list of strings, or token ids (a list of integers, or a list of them)",
    "documents": "documents must be a list of strings or of {\"text\": string} objects",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per field (at most 5), naming the field; pydantic's union noise folded into a hint."""
    parts: list[str] = []
    first: str | None = None
    seen: set[str] = set()
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field_name = loc[0] if loc else "body"
        if field_name in seen:
            continue
        if field_name in FIELD_HINTS and len(loc) > 1:
            seen.add(field_name)  # an error inside a union branch: say what the field accepts
            message = FIELD_HINTS[field_name]
        else:
            message = f"{'.'.join(loc) or 'body'}: {error.get('msg')}"
        first = first or field_name
        parts.append(message)
        if len(parts) == 5:
            break
    return "; ".join(parts) or "invalid request body", first


def create_app(client: Client, settings: FacadeSettings | None = None, on_shutdown: Any = None) -> FastAPI:
    """The FastAPI app for ``client``'s broker; ``on_shutdown`` runs after the facade stops."""
    settings = settings or FacadeSettings()
    facade = Facade(client, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        facade.directory.start()
        await facade.dispatcher.start()
        await anyio.to_thread.run_sync(facade.directory.first.wait, settings.discovery_timeout_s * 4 + 2)
        gc.collect()
        gc.freeze()  # start-up objects live as long as the app: keep full collections short
        try:
            yield
        finally:
            facade.directory.stop()
            await facade.dispatcher.stop()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="embedfleet", version="1", lifespan=lifespan,
                  description="OpenAI / infinity / Cohere-compatible embedding, rerank and classify endpoints.")
    app.state.facade = facade

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(bad(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "request_too_large" if exc.status_code == 413 else None
        headers = dict(exc.headers) if exc.headers else None  # e.g. Allow on 405
        return error_response(ApiError(exc.status_code, str(exc.detail), kind, None, code, headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.include_router(_router(facade, True), prefix="/v1")
    app.include_router(_router(facade, False))

    @app.get("/health", summary="Ready only when a worker for every served model answers",
             responses={503: {"description": "Not ready"}})
    async def health() -> Response:
        return facade.health()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(facade.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_Observe, metrics=facade.metrics)
    return app
