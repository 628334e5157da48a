"""What is served, learned from the workers in the background, so no request waits for it.

The facade asks every worker what it hosts (a broadcast control command, or the
``embedfleet.info`` task on transports without broadcast) every few seconds, counts the queued
messages of each model (the 429 backpressure reads the count), and resolves the model a
request names against the last answer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from producer.broker import INFO_TASK, MODELS_COMMAND, declare_queue
from producer.http.errors import bad, not_found, unavailable
from producer.http.metrics import WorkerSample
from producer.http.schemas import ModelCard
from producer.http.settings import FacadeSettings
from producer.jobs import INLINE_SUFFIX, JobKind, inline_queue_name, model_slug

log = logging.getLogger(__name__)


KINDS = {kind.value for kind in JobKind}
#: How often the directory thread counts queued messages (the 429 backpressure reads the count).
DEPTH_EVERY_S = 0.5

@dataclass(frozen=True)
class Placement:
    """One worker process serving a model: the device it runs on (as its host names it: ``cuda:1``,
    ``cpu:0``) and its own batch stats, so /health, /v1/models and metrics can speak per device."""

    worker: str
    device: str
    stats: dict[str, int]
    #: this engine's batch budget (each device profiles its own memory: mixed GPUs differ)
    max_batch_tokens: int = 0


@dataclass(frozen=True)
class ServedModel:
    """A model some worker answered for, merged over the workers that host it."""

    id: str
    ref: str
    kind: str
    queue: str
    inline_queue: str
    dimensions: int
    max_length: int
    labels: tuple[str, ...]
    backend: str
    device: str
    dtype: str
    token_ids: bool
    workers: tuple[str, ...]
    stats: dict[str, int]
    prompts: tuple[str, ...] = ()
    pooling: str = ""
    revision: str | None = None
    max_batch_tokens: int = 0
    placements: tuple[Placement, ...] = ()
    #: embed models: the outputs offered and those a request naming none gets (``producer.outputs``)
    outputs: tuple[str, ...] = ("dense",)
    default_outputs: tuple[str, ...] = ("dense",)
    multivector_dims: int = 0
    #: what its inputs may be: ("text",), or ("text", "image") for image-text models
    modalities: tuple[str, ...] = ("text",)

    def names(self) -> set[str]:
        return {self.id, self.ref, model_slug(self.id), model_slug(self.ref)}


def parse_wanted(entry: str) -> tuple[str | None, str]:
    """``kind:ref`` or ``ref``; a Windows drive letter is not a kind."""
    head, sep, tail = entry.partition(":")
    if sep and head in KINDS and tail:
        return head, tail
    return None, entry


def merge_answers(answers: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, ServedModel]:
    """Per queue: one entry, listing every worker that serves it and their summed batch stats."""
    merged: dict[str, ServedModel] = {}
    for worker, models in answers:
        for d in models:
            queue = str(d["queue"])
            stats = {k: int(v) for k, v in (d.get("stats") or {}).items()}
            previous = merged.get(queue)
            if previous is not None:
                stats = {k: stats.get(k, 0) + previous.stats.get(k, 0) for k in set(stats) | set(previous.stats)}
            workers = (previous.workers if previous else ()) + (worker,)
            placements = (previous.placements if previous else ()) + (
                Placement(worker, str(d["device"]), {k: int(v) for k, v in (d.get("stats") or {}).items()},
                          int(d.get("max_batch_tokens") or 0)),)
            merged[queue] = ServedModel(
                id=str(d["id"]), ref=str(d.get("ref") or d["id"]), kind=str(d["kind"]), queue=queue,
                inline_queue=str(d.get("inline_queue") or queue + INLINE_SUFFIX),
                dimensions=int(d["dimensions"]), max_length=int(d["max_length"]), labels=tuple(d.get("labels") or ()),
                backend=str(d["backend"]), device=str(d["device"]), dtype=str(d["dtype"]),
                token_ids=bool(d.get("token_ids", False)), workers=workers, stats=stats,
                prompts=tuple(d.get("prompts") or ()), pooling=str(d.get("pooling") or ""),
                revision=d.get("revision"), max_batch_tokens=int(d.get("max_batch_tokens") or 0),
                placements=placements,
                outputs=tuple(d.get("outputs") or ("dense",)), default_outputs=tuple(d.get("default_outputs") or ("dense",)),
                multivector_dims=int(d.get("multivector_dims") or 0),
                modalities=tuple(d.get("modalities") or ("text",)),
            )
    return merged


class Directory:
    """What is served, refreshed in the background; requests read the last answer and never wait."""

    def __init__(self, app: Any, settings: FacadeSettings) -> None:
        self.app = app
        self.settings = settings
        self.wanted = [parse_wanted(entry) for entry in settings.models]
        self.models: dict[str, ServedModel] = {}
        self.depths: dict[str, int] = {}
        self.refreshed_at = 0.0
        self.first = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._use_broadcast = settings.discovery != "task"
        self._created = int(time.time())
        #: (name, kind) -> (the ``models`` dict it was resolved in, the model): see ``resolve``
        self._resolved: dict[tuple[str | None, str], tuple[dict[str, ServedModel], ServedModel]] = {}

    # -- asking the workers
    def _broadcast(self) -> bool:
        mode = self.settings.discovery
        if mode != "auto":
            return mode == "broadcast"
        with self.app.connection_for_read() as conn:
            return bool(conn.transport.implements.exchange_type & {"fanout"})

    def ask(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """One round of answers: ``(worker, [model descriptions])``."""
        timeout = self.settings.discovery_timeout_s
        if self._use_broadcast:
            replies = self.app.control.broadcast(MODELS_COMMAND, reply=True, timeout=timeout) or []
            return [(worker, answer.get("models", [])) for reply in replies for worker, answer in reply.items()
                    if isinstance(answer, dict)]
        answers = []
        for kind, ref in self.wanted:  # no broadcast (SQS): ask on each wanted model's queue
            queue = inline_queue_name(kind or JobKind.embed.value, ref)
            declare_queue(self.app, queue)
            result = self.app.send_task(INFO_TASK, queue=queue, expires=max(timeout * 4, 5.0))
            try:
                answers.append((f"worker@{queue}", result.get(timeout=timeout, disable_sync_subtasks=False)))
            except Exception:  # no worker answered in time: the model is simply not served now
                pass
            finally:
                result.forget()
        return answers

    def queue_depths(self, queues: list[str]) -> dict[str, int]:
        """Messages waiting per queue (LLEN on Redis, qsize in memory, SQS's approximate count).

        Uses one connection kept by the directory thread; a queue that cannot be counted is left out.
        """
        if self._conn is None:
            self._conn = self.app.connection_for_read()
        channel = self._conn.default_channel
        size = getattr(channel, "_size", None)
        if size is None:  # not a kombu virtual transport: depth unknown
            return {}
        depths: dict[str, int] = {}
        for queue in queues:
            try:
                depths[queue] = int(size(queue))
            except Exception as exc:
                log.debug("cannot count queue %s: %s", queue, exc)
        return depths

    def depths_of(self, queue: str) -> int | None:
        """The last count of messages waiting in ``queue`` (``None``: not known)."""
        return self.depths.get(queue)

    def sample_depths(self) -> None:
        try:
            self.depths = self.queue_depths(sorted({q for m in self.models.values() for q in (m.queue, m.inline_queue)}))
        except Exception as exc:  # a broker hiccup: drop the connection, try again next round
            log.debug("queue depths unavailable: %s", exc)
            self.depths = {}
            self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
            self._conn = None

    def refresh(self) -> None:
        try:
            models = merge_answers(self.ask())
        except Exception as exc:  # a broker hiccup: keep serving what we knew, say so in the log
            log.warning("could not ask the workers what they serve: %s", exc)
            return
        self.models = models
        self.refreshed_at = time.monotonic()
        self.first.set()

    # -- lifecycle
    def start(self) -> None:
        self._use_broadcast = self._broadcast()
        self._thread = threading.Thread(target=self._loop, name="ef-facade-directory", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """Models every ``refresh_s``; queue depths (for backpressure) every ``DEPTH_EVERY_S``."""
        next_models = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_models:
                    self.refresh()
                    next_models = time.monotonic() + self.settings.refresh_s
                self.sample_depths()
                self._stop.wait(DEPTH_EVERY_S)
        finally:
            self._close_conn()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.discovery_timeout_s + 2)

    # -- lookups
    def fresh(self) -> bool:
        return self.first.is_set() and time.monotonic() - self.refreshed_at < 3 * self.settings.refresh_s + 5

    def served(self) -> list[ServedModel]:
        """Served models, restricted to the wanted ones when the facade was given a list."""
        return self._served(self.models)

    def _served(self, models: dict[str, ServedModel]) -> list[ServedModel]:
        found = list(models.values())
        if not self.wanted:
            return found
        return [m for m in found if any(self._matches(m, kind, ref) for kind, ref in self.wanted)]

    @staticmethod
    def _matches(model: ServedModel, kind: str | None, name: str) -> bool:
        return (kind is None or kind == model.kind) and bool(model.names() & {name, model_slug(name)})

    def named(self, name: object) -> list[ServedModel]:
        """The served models, of any kind, that ``name`` names (none for a name that is not a string)."""
        if not isinstance(name, str):
            return []
        return [m for m in self.served() if self._matches(m, None, name)]

    def resolve(self, name: str | None, kind: JobKind, route: str) -> ServedModel:
        """The served model a request names, resolved as infinity and TEI do.

        A name that matches a served model of the route's kind is that model. Otherwise, when
        exactly one model of the kind is served, it answers whatever the name (or none): clients
        send placeholders such as ``default`` or ``default/not-specified``, and the response says
        which model answered. A name of a served model of another kind is a 400; a wanted model
        with no worker right now, a 503; with several models of the kind, an unknown name is a
        404 listing them.

        A name resolved to a model is remembered until the next refresh replaces ``models`` (the
        answer depends on nothing else): ~8 us of matching names and slugs a request, ~100 us when
        the core comes to it cold (2-core Zen 4), become one look-up. Refusals are judged each time.
        """
        models = self.models
        known = self._resolved.get((name, kind.value))
        if known is not None and known[0] is models:
            return known[1]
        model = self._resolve(name, kind, route, models)
        if len(self._resolved) >= 1024:  # names are the clients' own: bounded
            self._resolved.clear()
        self._resolved[(name, kind.value)] = (models, model)
        return model

    def _resolve(self, name: str | None, kind: JobKind, route: str, models: dict[str, ServedModel]) -> ServedModel:
        served = self._served(models)
        of_kind = [m for m in served if m.kind == kind.value]
        if name is not None:
            matches = [m for m in served if self._matches(m, None, name)]
            exact = [m for m in matches if m.kind == kind.value]
            if exact:
                return exact[0]
            if matches:
                raise bad(f"model {name!r} is {JobKind(matches[0].kind).a_model}; {route} needs {kind.a_model}",
                          "model", "wrong_model_kind")
            if any(ref == name or model_slug(ref) == model_slug(name) for _, ref in self.wanted):
                raise unavailable(f"no worker for model {name!r} answers right now; retry later", "no_worker",
                                  "model", int(self.settings.refresh_s) + 1)
        if len(of_kind) == 1:
            return of_kind[0]
        if not served:  # no worker answers at all (thin facade): a wait, not a wrong name
            raise unavailable("no worker answers right now; retry later", "no_worker", "model",
                              int(self.settings.refresh_s) + 1)
        if not of_kind:
            raise not_found(f"no {kind.value} model is served here"
                            + (f" (served: {', '.join(sorted(m.id for m in served))})" if served else ""))
        listed = ", ".join(sorted(m.id for m in of_kind))
        if name is None:
            raise bad(f"model: required when this server serves several {kind.value} models (served: {listed})",
                      "model")
        raise not_found(f"model {name!r} is not served here ({kind.value} models served: {listed})")

    def card(self, model: ServedModel) -> ModelCard:
        capabilities = [model.kind] + (["image_embed"] if "image" in model.modalities else [])
        return ModelCard(id=model.id, created=self._created, kind=model.kind, capabilities=capabilities,
                         dimensions=model.dimensions, max_length=model.max_length, labels=list(model.labels),
                         backend=model.backend, device=model.device, dtype=model.dtype, workers=len(model.workers),
                         stats=dict(model.stats), prompts=list(model.prompts),
                         devices=[p.device for p in model.placements],
                         outputs=list(model.outputs) if model.kind == "embed" else [])

    def samples(self) -> list[WorkerSample]:
        return [WorkerSample(model=m.id, kind=m.kind, queue=m.queue, workers=len(m.workers),
                             queue_depth=self.depths.get(m.queue), inline_queue=m.inline_queue,
                             inline_queue_depth=self.depths.get(m.inline_queue), batches=m.stats.get("batches", 0),
                             items=m.stats.get("items", 0), tokens=m.stats.get("tokens", 0),
                             padded_tokens=m.stats.get("padded_tokens", 0),
                             devices=tuple((p.worker, p.device, p.stats.get("batches", 0), p.stats.get("tokens", 0))
                                           for p in m.placements))
                for m in self.served()]


