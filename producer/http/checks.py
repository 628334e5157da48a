"""Input checks at the HTTP door, so junk never reaches a worker (the rules are ``producer.rules``).

A request is judged against this facade's own limits (``--max-inputs``, ``--max-chars``,
``--max-request-tokens``): the first problem is the whole request's 400 or 413, naming the field
(``input[3]``), as OpenAI does.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from producer.http.coalesce import Answer
from producer.http.directory import ServedModel
from producer.http.errors import bad, too_large
from producer.http.schemas import BODY_TAGS
from producer.http.settings import FacadeSettings
from producer.rules import MAX_INPUT_CHARS, count_problem, dimensions_problem, text_problem, token_ids_problem


def check_texts(texts: list[str], settings: FacadeSettings, param: str) -> None:
    """Bounds and emptiness of a list of texts."""
    problem = count_problem(texts, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error(param)
    for index, text in enumerate(texts):
        problem = text_problem(text, settings.max_chars)
        if problem is not None:
            raise problem.error(f"{param}[{index}]")


#: Tokens a text can take beyond its bytes: the special tokens ([CLS] and [SEP], <s> and </s>).
SPECIAL_TOKENS = 2


def estimated_tokens(items: list[Any], max_length: int) -> int:
    """Tokens ``items`` can cost a worker at most, counted without the model's tokenizer.

    The thin facade holds no model files, and running the tokenizer at the door would spend the
    very CPU the budget protects (a 2,048 x 256-token request takes ~0.3 s to tokenize on two
    cores). So a text counts one token per UTF-8 byte plus the special tokens (a WordPiece or
    byte-level BPE token spans at least one byte, so this never counts too few), at most the
    model's maximum length (longer inputs are cut there, or refused with truncate=false); token
    ids count as given; a (query, document) pair counts both texts; an image counts nothing
    here (its cost is a fixed patch count, bounded by ``--max-inputs``). English prose runs ~4
    bytes per token, so short texts are over-counted, never under-counted."""
    total = 0
    for item in items:
        if isinstance(item, str):
            n = len(item.encode("utf-8")) + SPECIAL_TOKENS
        elif isinstance(item, tuple):
            n = sum(len(part.encode("utf-8")) for part in item) + SPECIAL_TOKENS + 1
        elif isinstance(item, list):
            n = len(item) + SPECIAL_TOKENS
        else:
            continue
        total += min(n, max_length)
    return total


def check_tokens(items: list[Any], model: ServedModel, settings: FacadeSettings, param: str) -> None:
    """413 for a request whose tokens (``estimated_tokens``) exceed ``--max-request-tokens``."""
    limit = settings.max_request_tokens
    if len(items) * model.max_length <= limit:  # every input at the model's maximum still fits
        return
    tokens = estimated_tokens(items, model.max_length)
    if tokens > limit:
        raise too_large(f"{param}: about {tokens:,} tokens (counted as one per UTF-8 byte, at most "
                        f"{model.max_length} per input), over the limit of {limit:,} per request; send "
                        "fewer or shorter inputs per request, or submit a corpus job", param)


def fit_texts(texts: list[str]) -> list[str]:
    """Texts as the workers take them: a facade allowed longer inputs (``--max-chars`` over
    100,000, as infinity accepts) cuts them at the workers' limit of ``MAX_INPUT_CHARS``
    characters. That is far past any served model's token maximum (8,192 tokens would need
    over 12 characters per token), so the model sees the same tokens it would have cut itself."""
    return [text[:MAX_INPUT_CHARS] for text in texts]


def check_dimensions(dimensions: int | None, model: ServedModel) -> None:
    problem = dimensions_problem(dimensions, model.dimensions)
    if problem is not None:
        raise problem.error("dimensions")


def embedding_inputs(value: Any, model: ServedModel, settings: FacadeSettings, param: str = "input") -> list[Any]:
    """Texts as a list; token-id arrays only where the worker's engine takes ids."""
    if isinstance(value, str):
        texts = [value]
    elif value and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif not value:
        raise bad(f"{param}: the list is empty; give at least one input", param)
    else:
        return _token_inputs(value, model, settings, param)
    check_texts(texts, settings, param)
    return fit_texts(texts)


#: On an image-text model's routes, an input that is one of these is an image, not a text.
IMAGE_DATA_URI = "data:image/"
IMAGE_REFERENCES = ("data:", "http://", "https://")


def image_or_text_inputs(value: Any, model: ServedModel, settings: FacadeSettings, param: str = "input") -> list[Any]:
    """``embedding_inputs``, except that on an image-text model (CLIP, SigLIP) each ``data:image/...``
    URI is an image input (``{"image": uri}``); the other items are checked as texts."""
    items = [value] if isinstance(value, str) else value
    if ("image" not in model.modalities or not isinstance(items, list) or not items
            or not all(isinstance(v, str) for v in items) or not any(v.startswith(IMAGE_DATA_URI) for v in items)):
        return embedding_inputs(value, model, settings, param)
    problem = count_problem(items, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error(param)
    out: list[Any] = []
    for index, item in enumerate(items):
        if item.startswith(IMAGE_DATA_URI):
            out.append({"image": item})
            continue
        problem = text_problem(item, settings.max_chars)
        if problem is not None:
            raise problem.error(f"{param}[{index}]")
        out.append(fit_texts([item])[0])
    return out


def image_inputs(value: Any, model: ServedModel, settings: FacadeSettings, param: str = "input") -> list[Any]:
    """infinity's ``/embeddings_image`` inputs: URLs or data URIs, for an image-text model only."""
    if "image" not in model.modalities:
        raise bad(f"model {model.id!r} embeds text only; images need an image-text model (CLIP, SigLIP)", "model")
    items = [value] if isinstance(value, str) else list(value)
    problem = count_problem(items, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error(param)
    for index, item in enumerate(items):
        if not item.startswith(IMAGE_REFERENCES):
            raise bad(f"{param}[{index}]: an image is an http(s) URL or a data: URI", f"{param}[{index}]")
    return [{"image": item} for item in items]


def _token_inputs(value: list[Any], model: ServedModel, settings: FacadeSettings, param: str) -> list[list[int]]:
    arrays = [value] if isinstance(value[0], int) else value
    if not model.token_ids:
        raise bad(f"{param}: token-id inputs are not supported yet by the workers serving {model.id!r}; "
                  "send texts", param, "token_ids_unsupported")
    problem = count_problem(arrays, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error(param)
    for index, ids in enumerate(arrays):
        problem = token_ids_problem(ids)
        if problem is None and len(ids) > model.max_length:
            raise bad(f"{param}[{index}]: {len(ids)} tokens exceed the model's maximum of {model.max_length}",
                      f"{param}[{index}]")
        if problem is not None:
            raise problem.error(f"{param}[{index}]")
    return [list(ids) for ids in arrays]


def per_item_errors(result: Answer, param: str) -> None:
    """The worker rejected some inputs: the whole request is a 400 naming them (OpenAI's way)."""
    if result.errors:
        shown = "; ".join(f"{param}[{i}]: {msg}" for i, msg in list(sorted(result.errors.items()))[:5])
        more = f" (and {len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
        first = min(result.errors)
        raise bad(f"{len(result.errors)} input(s) rejected: {shown}{more}", f"{param}[{first}]")


#: What a union-typed field accepts, said once instead of one error per union branch.
FIELD_HINTS = {
    "input": "input must be a string, a list of strings, or token ids (a list of integers, or a list of them)",
    "documents": "documents must be a list of strings or of {\"text\": string} objects",
    "inputs": "inputs must be a string, a list of strings, or token ids (a list of integers, or a list of them)",
    "ids": "ids must be a list of token ids, or a list of them",
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per field (at most 5), naming the field; pydantic's union noise folded into a hint."""
    parts: list[str] = []
    first: str | None = None
    seen: set[str] = set()
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON{f' ({reason})' if reason else ''}", None
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and p not in BODY_TAGS]
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


#: Cohere's and Voyage's input types -> the prompt names models use for them, in order of preference.
INPUT_TYPE_PROMPTS: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "query": ("query", "search_query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "document": ("document", "passage", "search_document", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


def prompt_for(model: ServedModel, input_type: str | None, prompt_name: str | None) -> str | None:
    """The prompt a request asks for, by name or by input type, checked against the model's prompts.

    As sentence-transformers' ``encode_query``/``encode_document`` do, an input type whose prompt
    the model does not define embeds without one (many models prompt queries only). A prompt name
    the model lacks, or an input type nobody defines, is a 400 listing what exists.
    """
    if prompt_name is not None:
        if prompt_name not in model.prompts:
            known = ", ".join(model.prompts) or "none"
            raise bad(f"prompt_name {prompt_name!r} is not defined by model {model.id!r} (its prompts: {known})",
                      "prompt_name")
        return prompt_name
    if input_type is None:
        return None
    for name in INPUT_TYPE_PROMPTS.get(input_type, (input_type,)):
        if name in model.prompts:
            return name
    if input_type in INPUT_TYPE_PROMPTS:
        return None
    types = ", ".join(INPUT_TYPE_PROMPTS)
    known = ", ".join(model.prompts) or "none"
    raise bad(f"input_type {input_type!r} is neither one of {types} nor a prompt of model {model.id!r} "
              f"(its prompts: {known})", "input_type")


def check_max_tokens(value: int | None, model: ServedModel, param: str) -> None:
    """Inputs are cut at the model's maximum length; a lower per-request cut is refused, not ignored."""
    if value is not None and value < model.max_length:
        raise bad(f"{param}: {value} is below the model's maximum of {model.max_length} tokens; inputs are cut at "
                  f"{model.max_length} tokens here, and a shorter cut per request is not supported (omit {param})",
                  param)
