"""Token-level inline calls (TEI's ``/tokenize``, ``/decode``, ``/embed_all``) on a hosted model.

They use the engine's own tokenizer (so the tokens are the ones the model sees, prompt and
truncation included) and, for ``embed_all``, its backend's token states (``Backend.token_states``)
in padded chunks of the backend's preferred batch size. A bad input fails alone, with a reason
and no position, like every other inline call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from producer.jobs import InlineResult, TokensJob
from producer.outputs import to_b64
from producer.rules import text_problem, token_ids_problem
from worker.backends.base import Batch
from worker.engine.pipeline import Engine
from worker.hosting.registry import Registry
from worker.models.tokenizer import Encoded


def run_tokens(job: TokensJob, engines: Registry) -> dict[str, Any]:
    """An ``InlineResult`` (as JSON) for one token-level call on its engine among ``engines`` (the worker's)."""
    engine = engines.engine_for(job.model, job.model_kind)
    engine.check_options(job.options)
    if job.op == "decode":
        result = _decode(engine, job)
    elif job.op == "tokenize":
        result = _tokenize(engine, job)
    else:
        result = _embed_all(engine, job)
    return result.model_dump(mode="json")


def _prefix(engine: Engine, job: TokensJob) -> str:
    name = job.options.prompt_name
    return job.options.prompt or (engine.info.prompts[name] if name else "")


def _texts(job: TokensJob, prefix: str) -> tuple[list[tuple[int, str]], dict[int, str]]:
    kept, errors = [], {}
    for index, text in enumerate(job.inputs):
        problem = text_problem(text)
        if problem is not None:
            errors[index] = problem.reason
        else:
            kept.append((index, prefix + text))
    return kept, errors


def _tokenize(engine: Engine, job: TokensJob) -> InlineResult:
    """Per text: ``{id, text, special, start, stop}`` for each token (offsets into the prompted text)."""
    kept, errors = _texts(job, _prefix(engine, job))
    tokenizer = engine.tokenizer._tokenizer
    tokens: list[list[dict[str, Any]]] = [[] for _ in job.inputs]
    encodings = tokenizer.encode_batch([text for _, text in kept], add_special_tokens=job.add_special_tokens)
    for (index, text), enc in zip(kept, encodings):
        for token_id, token, special, (start, stop) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets):
            if special:
                tokens[index].append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
            else:
                tokens[index].append({"id": token_id, "text": text[start:stop], "special": False, "start": start,
                                      "stop": stop})
    return InlineResult(kind=engine.info.kind, model=job.model, n_items=len(job.inputs), tokens=tokens,
                        n_tokens=[len(t) for t in tokens], errors=errors)


def _decode(engine: Engine, job: TokensJob) -> InlineResult:
    errors: dict[int, str] = {}
    kept: list[tuple[int, list[int]]] = []
    for index, ids in enumerate(job.inputs):
        problem = token_ids_problem(ids, engine.tokenizer.vocab_size)
        if problem is not None:
            errors[index] = problem.reason
        else:
            kept.append((index, list(ids)))
    texts = [""] * len(job.inputs)
    decoded = engine.tokenizer._tokenizer.decode_batch([ids for _, ids in kept],
                                                       skip_special_tokens=job.skip_special_tokens)
    for (index, _), text in zip(kept, decoded):
        texts[index] = text
    return InlineResult(kind=engine.info.kind, model=job.model, n_items=len(job.inputs), texts=texts,
                        n_tokens=[len(ids) for ids in job.inputs], errors=errors)


def _encoded(engine: Engine, job: TokensJob) -> tuple[dict[int, Encoded], dict[int, str]]:
    """Texts (with the prompt) or token ids, encoded as the engine would; over-long ones fail
    alone when truncation is off."""
    prefix = _prefix(engine, job)
    errors: dict[int, str] = {}
    texts: list[tuple[int, str]] = []
    ids: list[tuple[int, list[int]]] = []
    for index, value in enumerate(job.inputs):
        if isinstance(value, list):
            problem = token_ids_problem(value, engine.tokenizer.vocab_size)
            if problem is None and prefix:
                errors[index] = "a prompt cannot be put before token ids; send text instead"
            elif problem is None:
                ids.append((index, value))
        else:
            problem = text_problem(value)
            if problem is None:
                texts.append((index, prefix + value))
        if problem is not None:
            errors[index] = problem.reason
    encoded = dict(zip((i for i, _ in texts), engine.tokenizer.encode([t for _, t in texts])))
    encoded.update(zip((i for i, _ in ids), engine.tokenizer.encode_ids([v for _, v in ids])))
    for index, enc in list(encoded.items()):
        if enc.truncated and not job.options.truncate:
            errors[index] = (f"longer than the model's maximum of {engine.info.max_length} tokens "
                             "(set truncate=true to cut it)")
            del encoded[index]
    return encoded, errors


def _padded(encoded: list[Encoded], pad_id: int) -> Batch:
    lengths = np.array([e.n_tokens for e in encoded], dtype=np.int32)
    ids = np.full((len(encoded), int(lengths.max())), pad_id, dtype=np.int32)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encoded):
        ids[row, : enc.n_tokens], types[row, : enc.n_tokens], mask[row, : enc.n_tokens] = enc.ids, enc.type_ids, 1
    return Batch(ids, mask, types, lengths)


def _embed_all(engine: Engine, job: TokensJob) -> InlineResult:
    """Every token's vector, input after input (``n_tokens`` rows each), no pooling, no normalization."""
    encoded, errors = _encoded(engine, job)
    order = sorted(encoded)
    states: dict[int, np.ndarray] = {}
    budget = max(engine.backend.preferred_batch_tokens, engine.info.max_length)
    chunk: list[int] = []
    for index in order + [-1]:
        longest = max([encoded[i].n_tokens for i in chunk] + ([encoded[index].n_tokens] if index >= 0 else [0]))
        if chunk and (index < 0 or longest * (len(chunk) + 1) > budget):
            for i, rows in zip(chunk, engine.backend.token_states(_padded([encoded[i] for i in chunk],
                                                                           engine.tokenizer.pad_id))):
                states[i] = rows
            chunk = []
        if index >= 0:
            chunk.append(index)
    dims = engine.info.dims
    rows = [states[i] for i in order] or [np.zeros((0, dims), np.float32)]
    flat = np.concatenate(rows).astype(np.float32)
    if not np.isfinite(flat).all():
        bad = [i for i in order if not np.isfinite(states[i]).all()]
        raise ValueError(f"non-finite token embeddings for inputs {bad}")
    n_tokens = [int(states[i].shape[0]) if i in states else 0 for i in range(len(job.inputs))]
    return InlineResult(kind=engine.info.kind, model=job.model, n_items=int(flat.shape[0]), dims=int(flat.shape[1]),
                        data_b64=to_b64(flat, "<f4"), n_tokens=n_tokens, errors=errors)
