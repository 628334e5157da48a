"""What a worker hosts, answered over the broker (the facade's /v1/models, /health and /metrics).

Two ways to ask, because transports differ:

* a broadcast remote-control command (``embedfleet_models``) that every worker answers on its
  own control channel (Redis, the in-memory transport): the facade learns every worker and every
  model at once, and a busy model queue does not delay the answer;
* the ``embedfleet.info`` task, sent to one model's queue, for transports without broadcast (SQS).

Both answer for the worker that receives them (its registry, found through its Celery app), so
two workers in one process each report their own models.
"""

from __future__ import annotations

import socket
from typing import Any

from celery import shared_task
from celery.worker.control import inspect_command

from producer.broker import INFO_TASK, MODELS_COMMAND
from producer.errors import UnsupportedModel
from producer.jobs import Options, inline_queue_name, queue_name
from worker.engine.pipeline import Engine
from worker.hosting import registry as runtime
from worker.hosting.registry import Registry
from worker.models.resolve import ModelInfo


def describe_engine(engine: Engine, engines: Registry) -> dict[str, Any]:
    """One hosted model: what clients see in /v1/models, the queue it is served on, batch stats;
    its device as ``engines`` (the registry of the worker hosting it) names it."""
    info = engine.info
    facts = info.facts()
    return {
        "id": info.name,
        "ref": info.ref,
        "kind": info.kind.value,
        "queue": queue_name(info.kind, info.ref or info.name),
        "inline_queue": inline_queue_name(info.kind, info.ref or info.name),
        "dimensions": info.dims,
        "max_length": info.max_length,
        "labels": list(info.labels),
        "prompts": sorted(info.prompts),
        "pooling": info.pooling,
        "backend": engine.backend.name,
        "device": engines.device_of(engine),
        "dtype": engine.backend.dtype,
        "max_batch_tokens": engine.max_batch_tokens,
        "revision": info.revision,
        "token_ids": engine.accepts_token_ids,
        "outputs": list(engine.outputs),
        "default_outputs": list(engine.outputs_for(Options())),
        "multivector_dims": info.multivector_dims,
        "modalities": list(info.modalities),
        "stats": {key: int(value) for key, value in dict(engine.stats).items()},
        **{key: facts[key] for key in _FACTS},
        "faithful": True,
    }


#: what a model folder is (``ModelInfo.facts``), reported beside the serving details
_FACTS = ("family", "architecture", "pooling", "normalize", "default_prompt_name", "prompt_template")


def describe_refusal(info: ModelInfo, error: UnsupportedModel) -> dict[str, Any]:
    """A model this worker was asked to host but refused: where its jobs go (they fail with the
    reason), what it is, and why it is not served."""
    facts = info.facts()
    return {
        "id": info.name, "ref": info.ref, "kind": info.kind.value,
        "queue": queue_name(info.kind, info.ref or info.name),
        "inline_queue": inline_queue_name(info.kind, info.ref or info.name),
        "dimensions": info.dims, "max_length": info.max_length, "labels": list(info.labels),
        "prompts": sorted(info.prompts), "backend": "none", "device": "", "dtype": "", "max_batch_tokens": 0,
        "revision": info.revision, "token_ids": False, "stats": {},
        **{key: facts[key] for key in _FACTS},
        "faithful": False, "refusal": error.message,
    }


def hosted_models(engines: Registry) -> list[dict[str, Any]]:
    """One description per model this worker hosts, and per model it refused."""
    return ([describe_engine(engine, engines) for engine in engines.hosted()]
            + [describe_refusal(info, error) for info, error in engines.refused()])


@shared_task(name=INFO_TASK, bind=True)
def info_task(self: Any) -> list[dict[str, Any]]:
    return hosted_models(runtime.of(self.app))


@inspect_command(name=MODELS_COMMAND)
def models_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Broadcast answer: this worker's host name and hosted models (JSON, like every reply)."""
    return {"host": socket.gethostname(), "models": hosted_models(runtime.of(state.app))}
