"""The facade's app and routes: OpenAI / infinity / Cohere-shaped calls that enqueue and wait.

It holds no model. Each request becomes one inline job on the model's queue; concurrent
requests land in the same worker engine, so their texts share batches there. What is served
comes from ``Directory`` (asked in the background, so no request waits for it), input checks
from ``producer.http.checks``, the way to the workers from ``Dispatcher``.

Everything a client can get wrong is answered with an OpenAI-shaped error body before anything
reaches a worker: 400 bad input, 401 bad key, 404 unknown model, 413 too large, 429 overloaded,
503 no worker, 504 timed out. A bad request never costs another request anything.
"""

from __future__ import annotations

import base64
import gc
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.client import Client
from producer.errors import EmbedfleetError
from producer.http.checks import (
    check_dimensions,
    check_texts,
    embedding_inputs,
    per_item_errors,
    validation_message,
)
from producer.http.coalesce import Answer
from producer.http.directory import Directory, ServedModel
from producer.http.dispatch import Dispatcher
from producer.http.errors import bad, error_response, plain_response, unauthorized
from producer.http.metrics import CONTENT_TYPE, FacadeMetrics
from producer.http.middleware import BodyLimit, Observe
from producer.http.schemas import (
    ERRORS,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
)
from producer.http.settings import FacadeSettings
from producer.jobs import ClassifyJob, EmbedJob, JobKind, Options, RerankJob

log = logging.getLogger(__name__)


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
            raise unauthorized()

    # -- routes
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.embed, "/v1/embeddings")
        inputs = embedding_inputs(body.input, model, self.settings)
        check_dimensions(body.dimensions, model)
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

    @app.exception_handler(EmbedfleetError)
    async def _known(_: Request, exc: EmbedfleetError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc)
        return error_response(bad(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers) if exc.headers else None  # e.g. Allow on 405
        return plain_response(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return plain_response(500, f"internal error: {type(exc).__name__}")

    app.include_router(_router(facade, True), prefix="/v1")
    app.include_router(_router(facade, False))

    @app.get("/health", summary="Ready only when a worker for every served model answers",
             responses={503: {"description": "Not ready"}})
    async def health() -> Response:
        return facade.health()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(facade.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=facade.metrics)
    return app
