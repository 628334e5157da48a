"""Cohere's v2 routes: ``POST /v2/embed`` and ``POST /v2/rerank``, as ``cohere.ClientV2`` calls them.

``input_type`` maps onto the model's prompts (``producer.http.checks.prompt_for``),
``embedding_types`` are encoded by ``producer.http.encodings`` (Cohere's definitions),
``output_dimension`` is a Matryoshka cut, ``truncate`` END cuts over-long texts and NONE makes
them errors. Images, for image-text models (CLIP, SigLIP): ``images`` as data URIs (as Cohere
requires), or ``inputs`` whose ``content`` is one text or one ``image_url`` (a data URI or an
http(s) URL) each; these models have no fused text-and-image embedding (Cohere's embed-v4 does),
so an input of several components is refused, naming it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from producer.http import encodings
from producer.http.checks import (
    IMAGE_DATA_URI,
    IMAGE_REFERENCES,
    check_dimensions,
    check_max_tokens,
    embedding_inputs,
    image_inputs,
    prompt_for,
)
from producer.http.directory import ServedModel
from producer.http.facade import Facade
from producer.http.errors import bad
from producer.http.render import json_response, response_id, tokens
from producer.http.schemas import (
    ERRORS,
    CohereEmbedInput,
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereRerankResponse,
    CohereTextContent,
    RerankRequest,
)
from producer.http.settings import FacadeSettings
from producer.jobs import JobKind, Options
from producer.rules import count_problem, text_problem


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


def one_source(body: CohereEmbedRequest) -> str:
    """Which of ``texts``, ``images``, ``inputs`` the request gives: exactly one, as Cohere requires."""
    given = [name for name in ("texts", "images", "inputs") if getattr(body, name) is not None]
    if len(given) != 1:
        raise bad("give exactly one of texts, images or inputs" + (f" (this request gives {', '.join(given)})"
                                                                    if given else ""), given[-1] if given else "texts")
    return given[0]


def cohere_images(images: list[str], model: ServedModel, settings: FacadeSettings) -> list[Any]:
    """``images``: data URIs only (Cohere's rule), for an image-text model."""
    if "image" not in model.modalities:
        raise bad(f"images: model {model.id!r} embeds text only; images need an image-text model (CLIP, SigLIP)",
                  "images")
    for index, image in enumerate(images):
        if not image.startswith(IMAGE_DATA_URI):
            raise bad(f"images[{index}]: an image here is a data URI (data:image/png;base64,...); http(s) URLs "
                      "go in inputs as image_url content", f"images[{index}]")
    return image_inputs(images, model, settings, "images")


def cohere_inputs(inputs: list[CohereEmbedInput], model: ServedModel,
                  settings: FacadeSettings) -> tuple[list[Any], list[str]]:
    """``inputs``: one component each, a text or an image (a data URI or an http(s) URL); returns the
    engine's inputs and the texts among them."""
    problem = count_problem(inputs, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error("inputs")
    items: list[Any] = []
    for index, entry in enumerate(inputs):
        where = f"inputs[{index}].content"
        if len(entry.content) != 1:
            raise bad(f"{where}: {len(entry.content)} components; {model.id!r} embeds one text or one image per "
                      "input (a fused text-and-image embedding is Cohere embed-v4's, not CLIP's or SigLIP's): "
                      "send them as separate inputs", where)
        (part,) = entry.content
        if isinstance(part, CohereTextContent):
            problem = text_problem(part.text, settings.max_chars)
            if problem is not None:
                raise problem.error(f"{where}[0].text")
            items.append(part.text)
            continue
        if "image" not in model.modalities:
            raise bad(f"{where}[0]: model {model.id!r} embeds text only; images need an image-text model "
                      "(CLIP, SigLIP)", f"{where}[0]")
        url = part.image_url.url
        if not url.startswith(IMAGE_REFERENCES):
            raise bad(f"{where}[0].image_url.url: an image is an http(s) URL or a data: URI", f"{where}[0].image_url.url")
        items.append({"image": url})
    texts = [item for item in items if isinstance(item, str)]
    if texts:  # the same checks and cut of over-long texts as ``texts`` get
        checked = iter(embedding_inputs(texts, model, settings, "inputs"))
        items = [next(checked) if isinstance(item, str) else item for item in items]
    return items, [item for item in items if isinstance(item, str)]


async def embed(facade: Facade, body: CohereEmbedRequest) -> Response:
    source = one_source(body)
    model = facade.directory.resolve(body.model, JobKind.embed, "/v2/embed")
    if source == "texts":
        items: list[Any] = embedding_inputs(list(body.texts or []), model, facade.settings, "texts")
        texts = items
    elif source == "images":
        items, texts = cohere_images(list(body.images or []), model, facade.settings), []
    else:
        items, texts = cohere_inputs(list(body.inputs or []), model, facade.settings)
    check_dimensions(body.output_dimension, model)
    check_max_tokens(body.max_tokens, model, "max_tokens")
    # Cohere's input_type "image" names images; prompts apply to texts only
    input_type = None if body.input_type == "image" else body.input_type
    options = Options(dimensions=body.output_dimension, truncate=truncate_flag(body.truncate),
                      prompt_name=prompt_for(model, input_type, None) if texts else None)
    result = await facade.embed(model, items, options, source)
    n_images = len(items) - len(texts)
    billed = {"input_tokens": tokens(result), **({"images": n_images} if n_images else {})}
    answer = CohereEmbedResponse(id=response_id("embed"), embeddings={}, texts=texts,
                                 meta=_meta(**billed)).model_dump()
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
