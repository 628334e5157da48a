"""The facade's shared state and the calls every route makes; the OpenAI / infinity handlers.

``Facade`` holds the directory (what is served), the dispatcher (the way to the workers) and
the metrics. ``embed``, ``score`` and ``classify_texts`` are the three calls every route family
makes (OpenAI / infinity here, TEI's in ``producer.http.tei``, Cohere's in ``producer.http.cohere``):
a checked request in, the workers' answer out, a rejected input turned into a 400.
"""

from __future__ import annotations

import secrets
import sys
import time
from functools import lru_cache
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from producer.client import Client
from producer.http import encodings
from producer.http.checks import (
    check_dimensions,
    check_max_tokens,
    check_texts,
    check_tokens,
    embedding_inputs,
    fit_texts,
    image_inputs,
    image_or_text_inputs,
    per_item_errors,
    prompt_for,
)
from producer.http.coalesce import Answer
from producer.http.directory import Directory, ServedModel
from producer.http.dispatch import Dispatcher, Runner
from producer.http.errors import bad, unauthorized
from producer.http.metrics import FacadeMetrics
from producer.http.render import json_response, stamp, usage
from producer.http.schemas import ClassifyRequest, EmbeddingRequest, ImageEmbeddingRequest, RerankRequest
from producer.http.settings import FacadeSettings
from producer.jobs import ClassifyJob, EmbedJob, JobKind, Options, RerankJob


def numeric_type(body: EmbeddingRequest) -> str:
    """The type each value has: Voyage's ``output_dtype``, or a quantized ``encoding_format``."""
    quantized = body.encoding_format not in ("float", "base64")
    if quantized and body.output_dtype not in (None, body.encoding_format):
        raise bad(f"output_dtype {body.output_dtype!r} contradicts encoding_format {body.encoding_format!r}; give "
                  "one of them (or encoding_format base64 with output_dtype)", "output_dtype")
    return body.output_dtype or (body.encoding_format if quantized else "float")


def openai_rows(vectors: np.ndarray, body: EmbeddingRequest) -> list[Any]:
    """``encoding_format`` (and Voyage's ``output_dtype``, vLLM's ``embed_dtype``/``endianness``)."""
    kind = numeric_type(body)
    if body.encoding_format == "base64":
        order = "big" if body.endianness == "big" or (body.endianness == "native" and sys.byteorder == "big") \
            else "little"
        return encodings.base64_rows(vectors, kind, body.embed_dtype, order)
    return encodings.json_rows(vectors, kind)


def vector_output(model: ServedModel, body: EmbeddingRequest) -> str:
    """What ``/v1/embeddings`` answers with: the output asked (``output``), else the model's own
    (a ColBERT-only model's multi-vectors; dense for everything else). Checked before any work."""
    output = body.output or ("multivector" if "dense" not in model.default_outputs
                             and "multivector" in model.default_outputs else "dense")
    if output not in model.outputs:
        raise bad(f"output {output!r}: model {model.id!r} gives {', '.join(model.outputs)} (sparse vectors come "
                  "from /embed_sparse)", "output")
    if output == "multivector":
        if body.encoding_format not in ("float", "base64") or body.output_dtype not in (None, "float"):
            raise bad("multi-vector embeddings are sent as float or base64 (float32), not quantized",
                      "encoding_format")
        if body.dimensions or body.output_dimension:
            raise bad("dimensions applies to dense vectors, not to multi-vector embeddings", "dimensions")
    return output


def multivector_rows(result: Answer, body: EmbeddingRequest) -> list[Any]:
    """Per item its token vectors: a list of float32 arrays, or base64 of the ``[n, d]`` float32 matrix."""
    rows = list(result.multivector or [])
    if body.encoding_format == "base64":
        return [encodings.base64_rows(row.reshape(1, -1), "float", body.embed_dtype)[0] for row in rows]
    return [list(row) for row in rows]


@lru_cache(maxsize=256)
def shared_options(dimensions: int | None, prompt_name: str | None, normalize: bool | None, truncate: bool,
                   outputs: tuple[str, ...] | None) -> Options:
    """One ``Options`` for every request that asks the same (the 256 sets of fields asked most
    lately): most ask for the same few, and building one (pydantic, with its validators) was
    ~40 us of a single-text request when the core comes to it cold (2-core Zen 5, after 30 ms
    idle). Shared, so never changed after it is made: nothing in the facade or the engines changes
    an ``Options``. Fields ``Options`` refuses raise each time (an exception is not cached)."""
    return Options(dimensions=dimensions, prompt_name=prompt_name, normalize=normalize, truncate=truncate,
                   outputs=None if outputs is None else list(outputs))


class Facade:
    """State shared by the routes of one app, and the calls every route makes."""

    def __init__(self, client: Client, settings: FacadeSettings, runner: Runner | None = None) -> None:
        self.client = client
        self.settings = settings
        self.directory = Directory(client.app, settings)
        self.metrics = FacadeMetrics(self.directory.samples)
        self.dispatcher = Dispatcher(client.app, settings.timeout_s, settings.max_inflight, settings.max_queue_depth,
                                     settings.jobs_per_worker, self.directory.depths_of, self.metrics, runner)

    async def authorize(self, request: Request) -> None:
        """The bearer key check (async: FastAPI would run a plain function on a worker thread)."""
        if self.settings.api_key:
            self.check_key(request.headers.get("authorization", ""))

    def check_key(self, header: str) -> None:
        """401 unless ``header`` (the ``Authorization`` value) carries the API key, when one is set."""
        key = self.settings.api_key
        if not key:
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise unauthorized()

    # -- the calls the routes share
    async def embed(self, model: ServedModel, inputs: list[Any], options: Options, param: str = "input") -> Answer:
        """Embed checked inputs with ``model``; any rejected input makes the request a 400. A route
        that names no outputs wants dense vectors: a model without them is a 400 naming its own."""
        if options.outputs is None and "dense" not in model.default_outputs:
            raise bad(f"model {model.id!r} gives {', '.join(model.default_outputs)} embeddings, not dense vectors "
                      "(sparse vectors come from /embed_sparse)", "model")
        check_tokens(inputs, model, self.settings, param)
        job = EmbedJob(model=model.id, inputs=inputs, options=options)
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, param)
        self.count(model, result)
        return result

    async def score(self, model: ServedModel, query: str, documents: list[str], raw_scores: bool,
                    truncate: bool = True) -> Answer:
        """One relevance score per document (``values[:, 0]``)."""
        check_texts(documents, self.settings, "documents")
        check_texts([query], self.settings, "query")
        check_tokens([(query, document) for document in documents], model, self.settings, "documents")
        job = RerankJob(model=model.id, query=fit_texts([query])[0], documents=fit_texts(documents),
                        options=Options(raw_scores=raw_scores, truncate=truncate))
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, "documents")
        self.count(model, result)
        return result

    async def classify_texts(self, model: ServedModel, texts: list[str], raw_scores: bool, param: str = "input",
                             truncate: bool = True) -> Answer:
        check_texts(texts, self.settings, param)
        check_tokens(texts, model, self.settings, param)
        job = ClassifyJob(model=model.id, inputs=fit_texts(texts), options=Options(raw_scores=raw_scores, truncate=truncate))
        result = await self.dispatcher.call(job, model.inline_queue, len(model.workers))
        per_item_errors(result, param)
        self.count(model, result)
        return result

    # -- OpenAI / infinity routes
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.embed, "/v1/embeddings")
        inputs = image_or_text_inputs(body.input, model, self.settings)
        dimensions = body.dimensions or body.output_dimension
        check_dimensions(dimensions, model)
        numeric_type(body)  # a contradiction is a 400 before any work
        prompt_name = prompt_for(model, body.input_type, body.prompt_name)
        output = vector_output(model, body)
        options = shared_options(dimensions, prompt_name, body.normalize, body.truncation,
                                 None if output == "dense" and model.default_outputs == ("dense",) else (output,))
        result = await self.embed(model, inputs, options)
        rows = multivector_rows(result, body) if output == "multivector" else openai_rows(result.values, body)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        return json_response({"object": "list", "data": data, "model": model.id, "usage": usage(result),
                              **stamp("embd")})

    async def embeddings_image(self, body: ImageEmbeddingRequest) -> Response:
        """infinity's ``/embeddings_image``: image vectors of an image-text model, OpenAI-shaped."""
        model = self.directory.resolve(body.model, JobKind.embed, "/embeddings_image")
        inputs = image_inputs(body.input, model, self.settings)
        result = await self.embed(model, inputs, Options())
        rows = encodings.base64_rows(result.values) if body.encoding_format == "base64" else \
            encodings.json_rows(result.values)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        return json_response({"object": "list", "data": data, "model": model.id, "usage": usage(result),
                              **stamp("embd")})

    async def rerank(self, body: RerankRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.rerank, "/v1/rerank")
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        check_max_tokens(body.max_tokens_per_doc, model, "max_tokens_per_doc")
        result = await self.score(model, body.query, documents, body.raw_scores, body.truncation)
        scores = result.values[:, 0]
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))[: body.top_n or body.top_k]
        results = [{"index": i, "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
        return json_response({"object": "rerank", "model": model.id, "results": results, "data": results,
                              "usage": usage(result),
                              **stamp("rnk")})

    async def classify(self, body: ClassifyRequest) -> Response:
        model = self.directory.resolve(body.model, JobKind.classify, "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        result = await self.classify_texts(model, texts, body.raw_scores)
        data = [sorted(({"label": label, "score": float(p)} for label, p in zip(result.labels, row)),
                       key=lambda item: -item["score"]) for row in result.values]
        return json_response({"object": "classify", "model": model.id, "data": data, "usage": usage(result),
                              **stamp("cls")})

    def list_models(self) -> Response:
        cards = [self.directory.card(m).model_dump() for m in sorted(self.directory.served(), key=lambda m: m.id)]
        return json_response({"object": "list", "data": cards})

    def health(self) -> Response:
        served = self.directory.served()
        missing = [ref for kind, ref in self.directory.wanted
                   if not any(self.directory._matches(m, kind, ref) for m in served)]
        ready = self.directory.fresh() and bool(served) and not missing
        body = {"status": "ready" if ready else "not ready", "unix": time.time(),
                "models": {m.id: {"kind": m.kind, "workers": len(m.workers),  # no host names: it is open
                                  "devices": [{"device": p.device, "max_batch_tokens": p.max_batch_tokens}
                                              for p in m.placements]}
                           for m in served}, "missing": missing}
        return json_response(body, 200 if ready else 503)

    def count(self, model: ServedModel, result: Answer) -> None:
        """Tokens and inputs a request ran, for the metrics."""
        self.metrics.count(model.id, model.kind, int(sum(result.n_tokens)), len(result.n_tokens))
