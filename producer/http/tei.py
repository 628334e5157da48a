"""TEI's native routes (text-embeddings-inference's OpenAPI): same bodies, same answer shapes.

``/embed``, ``/embed_all``, ``/predict``, ``/rerank`` (TEI's ``texts`` body; the Cohere body keeps
its shape, see ``producer.http.app``), ``/similarity``, ``/tokenize``, ``/decode`` and ``/info``,
so a TEI client switches by changing its URL. Token-level calls travel as ``TokensJob``s
(answered by ``worker.hosting.tokens``). They run through the same ``Facade`` calls as the OpenAI routes. TEI's ``truncate``
defaults to this server's ``auto_truncate`` (true: inputs are cut at the model's maximum);
``truncation_direction`` "left" is refused with a clear error, as the engine cuts on the right.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import Response

from producer.http import encodings
from producer.http.checks import check_dimensions, check_texts, embedding_inputs, fit_texts, per_item_errors, prompt_for
from producer.http.coalesce import Answer
from producer.http.directory import ServedModel
from producer.http.facade import Facade
from producer.http.errors import bad, not_found
from producer.http.render import json_response
from producer.http.schemas import (
    Prediction,
    SimpleToken,
    TEIDecodeRequest,
    SparseValue,
    TEIEmbedRequest,
    TEIEmbedSparseRequest,
    TEIInfo,
    TEIPredictRequest,
    TEIRerankRequest,
    TEISimilarityRequest,
    TEITokenizeRequest,
)
from producer.jobs import JobKind, Options, TokensJob
from producer.rules import count_problem


#: What /info reports as the server version (TEI clients read it; this is the facade's API version).
API_VERSION = "1"


def truncation(truncate: bool | None, direction: str) -> bool:
    """TEI's ``truncate`` (default: auto-truncate) and ``truncation_direction`` (right only)."""
    if direction.lower() != "right":
        raise bad("truncation_direction: only 'right' is supported (inputs are cut at their end)",
                  "truncation_direction")
    return True if truncate is None else truncate


async def embed(facade: Facade, body: TEIEmbedRequest) -> Response:
    model = facade.directory.resolve(body.model, JobKind.embed, "/embed")
    inputs = embedding_inputs(body.inputs, model, facade.settings, "inputs")
    check_dimensions(body.dimensions, model)
    options = Options(normalize=body.normalize, truncate=truncation(body.truncate, body.truncation_direction),
                      dimensions=body.dimensions, prompt_name=prompt_for(model, None, body.prompt_name))
    result = await facade.embed(model, inputs, options, "inputs")
    return json_response(encodings.json_rows(result.values))


def require_output(model: ServedModel, output: str, route: str) -> None:
    """A 400 naming the model's outputs when it does not give ``output``."""
    if output not in model.outputs:
        raise bad(f"model {model.id!r} does not give {output} embeddings, so {route} cannot serve it (it gives "
                  f"{', '.join(model.outputs)})", "model")


async def embed_sparse(facade: Facade, body: TEIEmbedSparseRequest) -> Response:
    """TEI's sparse answer: per input, ``[{index, value}]`` for each non-zero weight, by index."""
    model = facade.directory.resolve(body.model, JobKind.embed, "/embed_sparse")
    require_output(model, "sparse", "/embed_sparse")
    inputs = embedding_inputs(body.inputs, model, facade.settings, "inputs")
    options = Options(truncate=truncation(body.truncate, body.truncation_direction), outputs=["sparse"],
                      prompt_name=prompt_for(model, None, body.prompt_name))
    result = await facade.embed(model, inputs, options, "inputs")
    rows = result.sparse or []
    return json_response([[{"index": int(i), "value": float(v)} for i, v in zip(*row)] for row in rows])


def predict_texts(inputs: Any) -> tuple[list[str], bool]:
    """TEI's predict inputs as texts, and whether one input (not a batch) was sent.

    TEI reads a list of two strings as a text pair; pairs are scored by cross-encoders, which
    this route does not serve, so they are refused with what to send instead.
    """
    if isinstance(inputs, str):
        return [inputs], True
    if inputs and all(isinstance(item, str) for item in inputs):
        raise bad("inputs: a list of strings is a text pair, and pairs are not classified here; send a text, "
                  "or a batch as [[text], [text], ...] (rerank pairs with /rerank)", "inputs")
    texts = []
    for index, item in enumerate(inputs):
        if len(item) != 1:
            raise bad(f"inputs[{index}]: a batch item is [text]; text pairs are not classified here "
                      "(rerank pairs with /rerank)", f"inputs[{index}]")
        texts.append(item[0])
    if not texts:
        raise bad("inputs: the list is empty; give at least one input", "inputs")
    return texts, False


async def predict(facade: Facade, body: TEIPredictRequest) -> Response:
    model = facade.directory.resolve(body.model, JobKind.classify, "/predict")
    texts, single = predict_texts(body.inputs)
    result = await facade.classify_texts(model, texts, body.raw_scores, "inputs",
                                         truncation(body.truncate, body.truncation_direction))
    rows = [sorted(({"score": float(p), "label": label} for label, p in zip(result.labels, row)),
                   key=lambda item: -item["score"]) for row in result.values]
    return json_response(rows[0] if single else rows)


async def rerank(facade: Facade, body: TEIRerankRequest) -> Response:
    """TEI's rerank answer: ``[{index, score, text?}]``, best first."""
    model = facade.directory.resolve(body.model, JobKind.rerank, "/rerank")
    result = await facade.score(model, body.query, list(body.texts), body.raw_scores,
                                truncation(body.truncate, body.truncation_direction))
    scores = result.values[:, 0]
    order = sorted(range(len(body.texts)), key=lambda i: (-float(scores[i]), i))
    return json_response([{"index": i, "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text
                                                                    else {})} for i in order])


async def similarity(facade: Facade, body: TEISimilarityRequest) -> Response:
    """Cosine similarity of the source sentence to each sentence (one job embeds them all)."""
    model = facade.directory.resolve(body.model, JobKind.embed, "/similarity")
    parameters = body.parameters
    texts = embedding_inputs([body.inputs.source_sentence, *body.inputs.sentences], model, facade.settings, "inputs")
    options = Options(normalize=True, truncate=truncation(parameters.truncate if parameters else None,
                                                          parameters.truncation_direction if parameters else "right"),
                      prompt_name=prompt_for(model, None, parameters.prompt_name if parameters else None))
    result = await facade.embed(model, texts, options, "inputs")
    vectors = result.values
    return json_response([float(x) for x in np.asarray(vectors[1:] @ vectors[0], dtype=np.float32)])


def any_model(facade: Facade, name: str | None, route: str) -> ServedModel:
    """The model a kind-agnostic route (tokenize, decode) uses: the one named, the only one
    served, else the embed model a name resolves to."""
    served = facade.directory.served()
    if name is not None:
        named = facade.directory.named(name)
        if named:
            return named[0]
    if len(served) == 1:
        return served[0]
    return facade.directory.resolve(name, JobKind.embed, route)


async def tokens_call(facade: Facade, model: ServedModel, job: TokensJob, param: str) -> Answer:
    result = await facade.dispatcher.call(job, model.inline_queue, len(model.workers))
    per_item_errors(result, param)
    return result


async def tokenize(facade: Facade, body: TEITokenizeRequest) -> Response:
    """Per input, its tokens as ``{id, text, special, start, stop}`` (offsets into the prompted text)."""
    model = any_model(facade, body.model, "/tokenize")
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    check_texts(texts, facade.settings, "inputs")
    job = TokensJob(model=model.id, model_kind=JobKind(model.kind), op="tokenize", inputs=fit_texts(texts),
                    add_special_tokens=body.add_special_tokens,
                    options=Options(prompt_name=prompt_for(model, None, body.prompt_name)))
    return json_response((await tokens_call(facade, model, job, "inputs")).tokens)


async def decode(facade: Facade, body: TEIDecodeRequest) -> Response:
    model = any_model(facade, body.model, "/decode")
    if not body.ids:
        raise bad("ids: the list is empty; give token ids (a list of integers, or a list of them)", "ids")
    arrays = [body.ids] if isinstance(body.ids[0], int) else list(body.ids)
    problem = count_problem(arrays, facade.settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error("ids")
    job = TokensJob(model=model.id, model_kind=JobKind(model.kind), op="decode", inputs=[list(a) for a in arrays],
                    skip_special_tokens=body.skip_special_tokens)
    return json_response((await tokens_call(facade, model, job, "ids")).texts)


async def embed_all(facade: Facade, body: TEIEmbedRequest) -> Response:
    """Every token's embedding per input, without pooling (TEI's ``/embed_all``)."""
    model = facade.directory.resolve(body.model, JobKind.embed, "/embed_all")
    inputs = embedding_inputs(body.inputs, model, facade.settings, "inputs")
    options = Options(truncate=truncation(body.truncate, body.truncation_direction),
                      prompt_name=prompt_for(model, None, body.prompt_name))
    job = TokensJob(model=model.id, op="embed_all", inputs=inputs, options=options)
    result = await tokens_call(facade, model, job, "inputs")
    facade.count(model, result)
    bounds = np.cumsum([0, *result.n_tokens])
    return json_response([list(result.values[bounds[i]:bounds[i + 1]]) for i in range(len(result.n_tokens))])


def info(facade: Facade, model_name: str | None) -> Response:
    """TEI's ``/info`` for the model TEI's routes answer with (``?model=`` picks among several)."""
    served = sorted(facade.directory.served(), key=lambda m: (list(JobKind).index(JobKind(m.kind)), m.id))
    if not served:
        raise not_found("no model is served here")
    model = served[0]
    if model_name is not None:
        named = facade.directory.named(model_name)
        if not named:
            raise not_found(f"model {model_name!r} is not served here (served: {', '.join(m.id for m in served)})")
        model = named[0]
    if model.kind == JobKind.embed.value:
        model_type: dict[str, Any] = {"embedding": {"pooling": model.pooling}}
    else:
        labels = {str(i): label for i, label in enumerate(model.labels)}
        kind = "reranker" if model.kind == JobKind.rerank.value else "classifier"
        model_type = {kind: {"id2label": labels, "label2id": {label: i for i, label in enumerate(model.labels)}}}
    settings = facade.settings
    body = TEIInfo(model_id=model.id, model_sha=model.revision, model_dtype=model.dtype, model_type=model_type,
                   max_concurrent_requests=settings.max_inflight, max_input_length=model.max_length,
                   max_batch_tokens=model.max_batch_tokens, max_client_batch_size=settings.max_inputs,
                   auto_truncate=True, tokenization_workers=2, version=API_VERSION,
                   models=[m.id for m in served])
    return json_response(body.model_dump())


ROOT_BODIES = {JobKind.embed.value: TEIEmbedRequest, JobKind.classify.value: TEIPredictRequest,
               JobKind.rerank.value: TEIRerankRequest}


async def root(facade: Facade, payload: Any) -> Response:
    """TEI's ``POST /``, as ``huggingface_hub.InferenceClient(model=URL)`` calls it: the route of
    the served model's kind (embed, predict or rerank), with ``parameters`` merged into the body."""
    if not isinstance(payload, dict):
        raise bad("the body must be a JSON object", None)
    body = {k: v for k, v in payload.items() if k != "parameters"}
    if isinstance(payload.get("parameters"), dict):
        body = {**payload["parameters"], **body}
    served = facade.directory.served()
    named = facade.directory.named(body.get("model"))
    kinds = {m.kind for m in (named or served)}
    if len(kinds) != 1:
        listed = ", ".join(sorted(f"{m.id} ({m.kind})" for m in served)) or "none"
        raise bad(f"POST / answers with the served model's kind; several kinds are served here ({listed}): name the "
                  "model, or call /embed, /predict or /rerank", "model")
    kind = kinds.pop()
    try:
        request = ROOT_BODIES[kind].model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if kind == JobKind.embed.value:
        return await embed(facade, request)  # type: ignore[arg-type]
    if kind == JobKind.classify.value:
        return await predict(facade, request)  # type: ignore[arg-type]
    return await rerank(facade, request)  # type: ignore[arg-type]


def register(router: APIRouter, facade: Facade) -> None:
    """TEI's routes on ``router`` (mounted at the root and at ``/v1``, like the others)."""

    @router.post("/embed", response_model=list[list[float]], summary="Embed (TEI)")
    async def embed_route(body: TEIEmbedRequest) -> Response:
        return await embed(facade, body)

    @router.post("/embed_sparse", response_model=list[list[SparseValue]], summary="Sparse embeddings (TEI)")
    async def embed_sparse_route(body: TEIEmbedSparseRequest) -> Response:
        return await embed_sparse(facade, body)

    @router.post("/predict", response_model=Union[list[Prediction], list[list[Prediction]]],  # type: ignore[arg-type]
                 summary="Classify (TEI)")
    async def predict_route(body: TEIPredictRequest) -> Response:
        return await predict(facade, body)

    @router.post("/similarity", response_model=list[float], summary="Cosine similarity to a source sentence (TEI)")
    async def similarity_route(body: TEISimilarityRequest) -> Response:
        return await similarity(facade, body)

    @router.post("/embed_all", response_model=list[list[list[float]]], summary="Every token's embedding (TEI)")
    async def embed_all_route(body: TEIEmbedRequest) -> Response:
        return await embed_all(facade, body)

    @router.post("/tokenize", response_model=list[list[SimpleToken]], summary="Tokenize (TEI)")
    async def tokenize_route(body: TEITokenizeRequest) -> Response:
        return await tokenize(facade, body)

    @router.post("/decode", response_model=list[str], summary="Token ids back to text (TEI)")
    async def decode_route(body: TEIDecodeRequest) -> Response:
        return await decode(facade, body)

    @router.get("/info", response_model=TEIInfo, summary="The served model (TEI)")
    async def info_route(model: str | None = None) -> Response:
        return info(facade, model)

