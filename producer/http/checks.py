"""Input checks at the HTTP door, so junk never reaches a worker (the rules are ``producer.rules``).

A request is judged against this facade's own limits (``--max-inputs``, ``--max-chars``): the
first problem is the whole request's 400 or 413, naming the field (``input[3]``), as OpenAI does.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from producer.http.coalesce import Answer
from producer.http.directory import ServedModel
from producer.http.errors import bad
from producer.http.settings import FacadeSettings
from producer.rules import count_problem, dimensions_problem, text_problem, token_ids_problem


def check_texts(texts: list[str], settings: FacadeSettings, param: str) -> None:
    """Bounds and emptiness of a list of texts."""
    problem = count_problem(texts, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error(param)
    for index, text in enumerate(texts):
        problem = text_problem(text, settings.max_chars)
        if problem is not None:
            raise problem.error(f"{param}[{index}]")


def check_dimensions(dimensions: int | None, model: ServedModel) -> None:
    problem = dimensions_problem(dimensions, model.dimensions)
    if problem is not None:
        raise problem.error("dimensions")


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
    problem = count_problem(arrays, settings.max_inputs, " per request")
    if problem is not None:
        raise problem.error("input")
    for index, ids in enumerate(arrays):
        problem = token_ids_problem(ids)
        if problem is None and len(ids) > model.max_length:
            raise bad(f"input[{index}]: {len(ids)} tokens exceed the model's maximum of {model.max_length}",
                      f"input[{index}]")
        if problem is not None:
            raise problem.error(f"input[{index}]")
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
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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
