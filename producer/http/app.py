"""The facade's app and routes: OpenAI / infinity / TEI / Cohere-shaped calls that enqueue and wait.

It holds no model. Each request becomes one inline job on the model's queue; concurrent
requests land in the same worker engine, so their texts share batches there. What is served
comes from ``Directory`` (asked in the background, so no request waits for it), input checks
from ``producer.http.checks``, the way to the workers from ``Dispatcher``.

Everything a client can get wrong is answered with an OpenAI-shaped error body before anything
reaches a worker: 400 bad input, 401 bad key, 404 unknown model, 413 too large, 429 overloaded,
503 no worker, 504 timed out. A bad request never costs another request anything.

The OpenAI / infinity routes are mounted here (their handlers are ``producer.http.facade``'s);
TEI's native routes come from ``producer.http.tei``, Cohere's v2 routes from
``producer.http.cohere``; all of them call the same ``Facade`` methods. The hot calls (a valid
``/v1/embeddings`` or TEI ``/embed`` body) are answered before FastAPI's routing, by the same
handlers, in ``producer.http.fast``.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Union

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.client import Client
from producer.errors import EmbedfleetError
from producer.http import cohere, tei
from producer.http.checks import validation_message
from producer.http.errors import bad, error_response, plain_response
from producer.http.dispatch import Runner
from producer.http.facade import Facade
from producer.http.fast import FastRoutes
from producer.http.metrics import CONTENT_TYPE
from producer.http.render import json_response
from producer.http.middleware import AssumeJson, BodyLimit, CancelOnDisconnect, Observe
from producer.http.schemas import (
    ERRORS,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ImageEmbeddingRequest,
    ModelList,
    Rank,
    RerankBody,
    RerankResponse,
    TEIRerankRequest,
)
from producer.http.settings import FacadeSettings

log = logging.getLogger(__name__)


def _router(facade: Facade) -> APIRouter:
    """The API routes; mounted at ``/v1`` and at the root (infinity, TEI and LangChain call
    ``/embeddings``), both in the OpenAPI schema so generators and fuzzers see the whole API."""
    router = APIRouter(dependencies=[Depends(facade.authorize)], responses=ERRORS)

    @router.post("/embeddings", response_model=EmbeddingResponse, summary="Embed texts (OpenAI-compatible)")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await facade.embeddings(body)

    @router.post("/embeddings_image", response_model=EmbeddingResponse,
                 summary="Embed images: URLs or data URIs (infinity-compatible; CLIP, SigLIP)")
    async def embeddings_image(body: ImageEmbeddingRequest) -> Response:
        return await facade.embeddings_image(body)

    @router.post("/rerank", response_model=Union[RerankResponse, list[Rank]],  # type: ignore[arg-type]
                 summary="Rerank documents against a query (Cohere/Jina body; TEI's body with `texts`)")
    async def rerank(body: RerankBody) -> Response:
        if isinstance(body, TEIRerankRequest):
            return await tei.rerank(facade, body)
        return await facade.rerank(body)

    @router.post("/classify", response_model=ClassifyResponse, summary="Classify texts (infinity shape)")
    async def classify(body: ClassifyRequest) -> Response:
        return await facade.classify(body)

    @router.get("/models", response_model=ModelList, summary="Served models")
    async def models() -> Response:
        return facade.list_models()

    tei.register(router, facade)
    return router



def _keyed_docs(app: FastAPI, facade: Facade) -> None:
    """``/openapi.json`` and ``/docs`` behind the API key (FastAPI serves its own without any)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(facade.authorize)])
    async def openapi() -> Response:
        return json_response(app.openapi(), 200)

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(facade.authorize)])
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="embedfleet")


def create_app(client: Client, settings: FacadeSettings | None = None, on_shutdown: Any = None,
               runner: Runner | None = None) -> FastAPI:
    """The FastAPI app for ``client``'s broker; ``on_shutdown`` runs after the facade stops;
    ``runner``: the engines of this process (embedded mode), which take jobs without a message."""
    settings = settings or FacadeSettings()
    facade = Facade(client, settings, runner)

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

    keyed = bool(settings.api_key)  # with a key, the schema and its page are behind it too
    app = FastAPI(title="embedfleet", version="1", lifespan=lifespan,
                  description="OpenAI / infinity / Cohere-compatible embedding, rerank and classify endpoints.",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if keyed else {}))
    app.state.facade = facade
    if keyed:
        _keyed_docs(app, facade)

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

    @app.post("/", dependencies=[Depends(facade.authorize)], responses=ERRORS,
              summary="TEI's root route: embed, predict or rerank, by the served model's kind")
    async def root(body: dict[str, Any]) -> Response:
        return await tei.root(facade, body)

    app.include_router(_router(facade), prefix="/v1")
    app.include_router(_router(facade))
    app.include_router(cohere.router(facade))

    @app.get("/health", summary="Ready only when a worker for every served model answers",
             responses={503: {"description": "Not ready"}})
    async def health() -> Response:
        return facade.health()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             dependencies=[Depends(facade.authorize)] if settings.protect_metrics else [])
    async def metrics() -> Response:
        return Response(facade.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(FastRoutes, facade=facade)  # innermost: inside the metrics, limits and the hang-up watch
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(AssumeJson)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=facade.metrics)
    return app
