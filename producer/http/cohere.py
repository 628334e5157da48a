"""Cohere's v2 routes: ``POST /v2/embed`` and ``POST /v2/rerank``, as ``cohere.ClientV2`` calls them.

``input_type`` maps onto the model's prompts (``producer.http.checks.prompt_for``),
``embedding_types`` are encoded by ``producer.http.encodings`` (Cohere's definitions),
``output_dimension`` is a Matryoshka cut, ``truncate`` END cuts over-long texts and NONE makes
them errors. Images are not served here and say so.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from producer.http import encodings
from producer.http.checks import check_dimensions, check_max_tokens, embedding_inputs, prompt_for
from producer.http.facade import Facade
from producer.http.errors import bad
from producer.http.render import json_response, response_id, tokens
from producer.http.schemas import ERRORS, CohereEmbedRequest, CohereEmbedResponse, CohereRerankResponse, RerankRequest
from producer.jobs import JobKind, Options



def _meta(**billed: int) -> dict[str, Any]:
    return {"api_version": {"version": "2"}, "billed_units": billed}


def truncate_flag(truncate: str) -> bool:
    """Cohere's END cuts at the model's maximum, NONE refuses over-long texts; START is not offered."""
    if truncate == "START":
        raise bad("truncate: START is not supported (inputs are cut at their end); use END or NONE", "truncate")
    return truncate == "END"


def embeddings_by_type(vectors: Any, types: list[str]) -> dict[str, list[Any]]:
    """``{type: rows}`` for each type asked for (base64: of the float32 values)."""
    out: dict[str, list[Any]] = {}
    for kind in dict.fromkeys(types):
        out[kind] = encodings.base64_rows(vectors) if kind == "base64" else encodings.json_rows(vectors, kind)
    return out


async def embed(facade: Facade, body: CohereEmbedRequest) -> Response:
    if body.images or body.inputs:
        raise bad("images and inputs are not served here: send texts", "images" if body.images else "inputs")
    if not body.texts:
        raise bad("texts: required (a list of at least one text)", "texts")
    model = facade.directory.resolve(body.model, JobKind.embed, "/v2/embed")
    texts = embedding_inputs(list(body.texts), model, facade.settings, "texts")
    check_dimensions(body.output_dimension, model)
    check_max_tokens(body.max_tokens, model, "max_tokens")
    options = Options(dimensions=body.output_dimension, truncate=truncate_flag(body.truncate),
                      prompt_name=prompt_for(model, body.input_type, None))
    result = await facade.embed(model, texts, options, "texts")
    answer = CohereEmbedResponse(id=response_id("embed"), embeddings={}, texts=texts,
                                 meta=_meta(input_tokens=tokens(result))).model_dump()
    answer["embeddings"] = embeddings_by_type(result.values, list(body.embedding_types))
    return json_response(answer)


async def rerank(facade: Facade, body: RerankRequest) -> Response:
    model = facade.directory.resolve(body.model, JobKind.rerank, "/v2/rerank")
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    check_max_tokens(body.max_tokens_per_doc, model, "max_tokens_per_doc")
    result = await facade.score(model, body.query, documents, body.raw_scores)
    scores = result.values[:, 0]
    order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))[: body.top_n]
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
    return json_response({"id": response_id("rerank"), "results": results,
                          "meta": _meta(search_units=1, input_tokens=tokens(result))})


def router(facade: Facade) -> APIRouter:
    """The ``/v2`` routes (Cohere's API version 2)."""
    routes = APIRouter(prefix="/v2", dependencies=[Depends(facade.authorize)], responses=ERRORS)

    @routes.post("/embed", response_model=CohereEmbedResponse, summary="Embed texts (Cohere v2)")
    async def embed_route(body: CohereEmbedRequest) -> Response:
        return await embed(facade, body)

    @routes.post("/rerank", response_model=CohereRerankResponse, summary="Rerank documents (Cohere v2)")
    async def rerank_route(body: RerankRequest) -> Response:
        return await rerank(facade, body)

    return routes
