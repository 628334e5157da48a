"""The ETL client: small synchronous calls, and bulk corpus jobs that return a ``JobHandle``.

Small calls carry their inputs inline and get results back through the result backend as
base64 float32. Bulk jobs are written to the output folder first (``_job.json``) and travel as
shard references; progress is read from the shards' done-markers in storage, so any process
that can read the output folder can follow a job, even after the submitter is gone.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pybase64
import pyarrow as pa

from producer import sources, storage
from producer.broker import (
    INLINE_TASK,
    MEMORY_BROKER,
    SHARD_TASK,
    declare_queue,
    job_forgotten,
    make_app,
    record_job,
    unwritten_shards,
)
from producer.errors import BadInput, InputError, JobFailed, JobLost, JobNotFound, OutputConflict, from_wire
from producer.signing import sign
from producer.outputs import DENSE_ONLY, Embeddings, MultiVectors, SparseRows, from_b64
from producer.jobs import (
    DEFAULT_MODEL,
    JOB_FILE,
    MANIFEST,
    PARTS_DIR,
    SUCCESS,
    ClassifyJob,
    Columns,
    EmbedJob,
    InlineResult,
    JobKind,
    JobManifest,
    JobSpec,
    Options,
    RerankJob,
    ShardJob,
    wire,
    ShardReport,
    marker_name,
    part_name,
    inline_queue_name,
    queue_name,
    stable_job_id,
)

DEFAULT_SHARD_ROWS = 10_000

__all__ = ["Client", "JobHandle", "Progress", "Classification", "Embeddings", "plan_corpus", "normalize_out",
           "decode_f32", "decode_outputs", "InputError", "JobFailed", "DEFAULT_MODEL", "DEFAULT_SHARD_ROWS"]


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """A job's state from its done-markers. ``rows_done``: rows of finished shards (rejected ones
    included); ``rows_failed``: rejected rows plus the rows of parked shards (``rows_parked``)."""

    n_shards: int
    shards_done: int
    shards_failed: int
    rows_total: int
    rows_done: int
    rows_failed: int
    rows_parked: int = 0

    @property
    def finished(self) -> bool:
        return self.shards_done + self.shards_failed >= self.n_shards

    @property
    def rows_finished(self) -> int:
        """Rows the job is through with, each counted once (a progress bar's count)."""
        return self.rows_done + self.rows_parked


def normalize_out(out: str) -> str:
    """An output folder without its trailing slash: ``vectors/`` and ``vectors`` are one job."""
    stripped = out.rstrip("/")
    if not stripped or stripped.endswith(":"):  # "/" or "s3://": nothing to strip
        return out
    return stripped


def decode_f32(data_b64: str, n_items: int, dims: int) -> np.ndarray:
    raw = from_b64(data_b64, "<f4")
    return raw.reshape(n_items, dims).astype(np.float32, copy=False)


def decode_outputs(result: InlineResult) -> Embeddings:
    """Every output an inline result carries (``producer.outputs``), decoded once."""
    outputs = tuple(result.outputs) or DENSE_ONLY
    dense = decode_f32(result.data_b64, result.n_items, result.dims) if "dense" in outputs else None
    sparse = SparseRows.from_wire(result.sparse_counts, result.sparse_indices_b64, result.sparse_values_b64,
                                  result.vocab_size) if "sparse" in outputs else None
    multivector = MultiVectors.from_wire(result.multivector_counts, result.multivector_dims,
                                         result.multivector_b64) if "multivector" in outputs else None
    return Embeddings(dense=dense, sparse=sparse, multivector=multivector)


def image_reference(image: Any) -> str:
    """An image as the wire carries it: a data URI (bytes, local files) or the URL as given."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    else:
        raise BadInput(f"an image is bytes, a path, a data: URI or an http(s) URL, not {type(image).__name__}",
                       param="images")
    return "data:application/octet-stream;base64," + pybase64.b64encode_as_string(data)


#: How long a job must stay forgotten by its broker before ``wait`` gives up on it: long enough
#: for a resubmission or a sweeper in flight to record it again, short next to the 2 minutes a
#: user should wait to learn that the broker lost their job.
FORGOTTEN_GRACE_S = 15.0


class JobHandle:
    """Follow a bulk job through its output folder: progress, wait, outputs."""

    def __init__(self, out: str, job_id: str, n_shards: int, n_rows: int, enqueued: int = 0,
                 skipped_rows: int = 0, skipped_tokens: int = 0, broker: str | None = None,
                 queue: str | None = None) -> None:
        self.out = out
        #: where the workers record shards whose failure could not be written (``broker.record_unwritten``)
        self.broker = broker
        #: the job's queue on that broker (``wait`` tells a forgotten job by it)
        self.queue = queue
        self.job_id = job_id
        self.n_shards = n_shards
        self.n_rows = n_rows
        self.enqueued = enqueued
        #: Rows (and their tokens) of shards an earlier run finished: skipped by this submission.
        self.skipped_rows = skipped_rows
        self.skipped_tokens = skipped_tokens

    @classmethod
    def open(cls, out: str, broker: str | None = None) -> "JobHandle":
        """A handle for the job whose output folder is ``out`` (``broker``: see ``unwritten``)."""
        spec = storage.read_job(out)
        return cls(out, spec.job_id, len(spec.shards), spec.n_rows, broker=broker,
                   queue=queue_name(spec.kind, spec.model))

    def forgotten(self) -> bool:
        """Whether the broker lost this job: no record of it and nothing queued (``broker.job_forgotten``)."""
        return bool(self.broker and self.queue) and job_forgotten(self.broker, self.job_id, str(self.queue))

    def _lost(self, progress: Progress) -> JobLost:
        missing = [i for i in range(self.n_shards) if i not in storage.read_markers(self.out)]
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        where = str(self.broker).split("@")[-1]
        broker = self.broker if "@" not in str(self.broker) else "URL"
        return JobLost(f"job {self.job_id}: the broker {where} holds no message of it any more, and "
                       f"{len(missing)} of {self.n_shards} shards are not done (shards {shown}): it lost them "
                       f"(a Redis restarted without persistence?); `embedfleet resume {self.out} --broker "
                       f"{broker}` sends them again")

    def unwritten(self) -> dict[int, str]:
        """Shards that failed where not even their failure marker could be written: index -> error."""
        return unwritten_shards(self.broker, self.job_id, self.queue)

    def progress(self) -> Progress:
        reports = storage.read_markers(self.out)
        done = [r for r in reports.values() if r.status == "done"]
        parked = sum(r.rows_in for r in reports.values() if r.status != "done")
        lost = [i for i in self.unwritten() if i not in reports]
        return Progress(
            n_shards=self.n_shards,
            shards_done=len(done),
            shards_failed=len(reports) - len(done) + len(lost),
            rows_total=self.n_rows,
            rows_done=sum(r.rows_in for r in done),
            rows_failed=sum(len(r.errors) for r in done) + parked,
            rows_parked=parked,
        )

    def manifest(self) -> JobManifest | None:
        return storage.read_manifest(self.out)

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: Callable[[Progress], None] | None = None,
        raise_on_failure: bool = True,
    ) -> JobManifest:
        """Block until the manifest is written; raise ``JobFailed`` if shards were parked."""
        deadline = None if timeout is None else time.monotonic() + timeout
        forgotten_since: float | None = None  # when the broker was first seen to have lost the job
        while True:
            progress = self.progress()
            if on_progress:
                on_progress(progress)
            if progress.finished or not self.forgotten():
                forgotten_since = None
            elif forgotten_since is None:
                forgotten_since = time.monotonic()
            elif time.monotonic() - forgotten_since >= FORGOTTEN_GRACE_S:
                raise self._lost(progress)
            manifest = self.manifest() if progress.finished else None
            if manifest is None and progress.finished:
                self._raise_unwritten()
            if manifest is not None:
                if raise_on_failure and manifest.status != "complete":
                    failed = ", ".join(str(s.index) for s in manifest.failed_shards)
                    raise JobFailed(f"job {self.job_id}: shards {failed} failed; see {self.out}/_manifest.json")
                return manifest
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} not finished after {timeout} s ({progress})")
            time.sleep(poll)

    def _raise_unwritten(self) -> None:
        """Every shard is accounted for, but some only beside the queue: the output is unwritable."""
        lost = {i: r for i, r in self.unwritten().items() if i not in storage.read_markers(self.out)}
        if lost:
            index, reason = sorted(lost.items())[0]
            raise JobFailed(f"job {self.job_id}: {len(lost)} shard(s) could not be written to {self.out} "
                            f"(shard {index}: {reason})")

    def outputs(self) -> list[str]:
        """URIs of the Parquet parts (complete once the job is)."""
        manifest = self.manifest()
        names = manifest.parts if manifest else [part_name(i) for i in sorted(storage.read_markers(self.out))]
        root = storage.locate(self.out)
        return [root.child(name).uri for name in names]

    def read(self) -> pa.Table:
        """All parts as one table, in shard order."""
        tables = [storage.read_table(storage.locate(uri)) for uri in self.outputs()]
        return pa.concat_tables(tables) if tables else pa.table({})


class Client:
    """Enqueue embed / rerank / classify work for embedfleet workers."""

    def __init__(
        self,
        broker: str = MEMORY_BROKER,
        result_backend: str | None = None,
        app: Any = None,
        timeout: float = 300.0,
    ) -> None:
        self.app = app if app is not None else make_app(broker, result_backend)
        self.timeout = timeout

    # ------------------------------------------------------------------ small calls
    def _call(self, job: EmbedJob | RerankJob | ClassifyJob, timeout: float | None) -> InlineResult:
        queue = inline_queue_name(job.kind, job.model)
        declare_queue(self.app, queue)
        async_result = self.app.send_task(INLINE_TASK, args=[wire(job)], queue=queue)
        try:
            # disable_sync_subtasks=False: in embedded mode the caller may share a process with the worker.
            payload = async_result.get(timeout=timeout or self.timeout, propagate=True, disable_sync_subtasks=False)
        finally:
            async_result.forget()
        result = InlineResult.model_validate(payload)
        if result.error is not None:  # the worker refused the call (an unsupported model, bad options)
            raise from_wire(result.error)
        return result

    def call(self, job: EmbedJob | RerankJob | ClassifyJob, timeout: float | None = None) -> InlineResult:
        """One prepared inline job as it is; raises the worker's refusal (bad options, unsupported model)."""
        return self._call(job, timeout)

    def embed_result(self, texts: list[str], model: str = DEFAULT_MODEL, timeout: float | None = None, **options: Any) -> InlineResult:
        """The raw inline result (vectors, token counts, per-item errors), for callers that want all."""
        return self._call(EmbedJob(model=model, inputs=list(texts), options=Options(**options)), timeout)

    def embed(self, texts: list[str] | str, model: str = DEFAULT_MODEL, timeout: float | None = None,
              **options: Any) -> Any:
        """Vectors ``[n, dims]`` float32; raises ``InputError`` naming any rejected input.

        With ``outputs=[...]`` (``dense``, ``sparse``, ``multivector``) it returns
        ``producer.outputs.Embeddings`` instead: ``.dense`` ``[n, dims]``, ``.sparse[i]`` an
        ``(indices, values)`` pair (``.sparse.to_scipy()``: a CSR matrix), ``.multivector[i]``
        ``[n_vectors, d]``; a single text gives the same with one row."""
        single = isinstance(texts, str)
        result = self.embed_result([texts] if single else list(texts), model, timeout, **options)
        if result.errors:
            raise InputError(result.errors)
        if options.get("outputs") is not None:
            return decode_outputs(result)
        if result.outputs and "dense" not in result.outputs:
            raise BadInput(f"model {model!r} gives {', '.join(result.outputs)} outputs, not dense vectors; "
                           f"call embed(..., outputs={list(result.outputs)!r})", param="outputs")
        vectors = decode_f32(result.data_b64, result.n_items, result.dims)
        return vectors[0] if single else vectors

    def embed_images(self, images: list[Any], model: str, timeout: float | None = None, **options: Any) -> np.ndarray:
        """Image vectors ``[n, dims]`` of an image-text model (CLIP, SigLIP), in the same space as its
        texts' ``embed``. Each image is bytes, a local path (read here and sent as a data URI), a
        ``data:`` URI or an ``http(s)`` URL (fetched by the worker); ``InputError`` names bad ones."""
        inputs = [{"image": image_reference(image)} for image in images]
        result = self._call(EmbedJob(model=model, inputs=inputs, options=Options(**options)), timeout)
        if result.errors:
            raise InputError(result.errors)
        return decode_f32(result.data_b64, result.n_items, result.dims)

    def rerank(self, query: str, documents: list[str], model: str, timeout: float | None = None, **options: Any) -> np.ndarray:
        """One relevance score per document, in the documents' order."""
        result = self._call(RerankJob(model=model, query=query, documents=list(documents), options=Options(**options)), timeout)
        if result.errors:
            raise InputError(result.errors)
        return decode_f32(result.data_b64, result.n_items, result.dims)[:, 0]

    def classify(self, texts: list[str], model: str, timeout: float | None = None, **options: Any) -> list[Classification]:
        result = self._call(ClassifyJob(model=model, inputs=list(texts), options=Options(**options)), timeout)
        if result.errors:
            raise InputError(result.errors)
        probs = decode_f32(result.data_b64, result.n_items, result.dims)
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(Classification(result.labels[best], float(row[best]), dict(zip(result.labels, map(float, row)))))
        return out

    # ------------------------------------------------------------------ bulk jobs
    def submit_corpus(
        self,
        source: Any,
        out: str,
        model: str = DEFAULT_MODEL,
        kind: JobKind | str = JobKind.embed,
        text_column: str = "text",
        id_column: str | None = None,
        query_column: str = "query",
        document_column: str = "document",
        shard_rows: int = DEFAULT_SHARD_ROWS,
        options: Options | None = None,
        image_column: str | None = None,
    ) -> JobHandle:
        """Plan a corpus into shards, record the job in ``out``, and enqueue unfinished shards.

        ``source`` is a path or s3:// URI (Parquet, JSONL, CSV, text), a pandas DataFrame or a
        pyarrow Table (written to ``out/_input.parquet`` first, so shards stay references).
        Submitting the same job again enqueues only the shards that have no done-marker (the
        handle's ``skipped_rows`` counts their rows). ``id_column`` defaults to the input's ``id``
        column when it has one (``producer.sources.default_id_column``).
        """
        out = normalize_out(out)
        spec = plan_corpus(source, out, model=model, kind=kind, text_column=text_column, id_column=id_column,
                           query_column=query_column, document_column=document_column, shard_rows=shard_rows,
                           options=options, image_column=image_column)
        return self._enqueue(spec, out)

    def resume(self, out: str) -> JobHandle:
        """Send again the shards of the job recorded in ``out`` that have no done-marker.

        What a broker that lost its data (a Redis restarted without persistence) needs: the output
        folder's ``_job.json`` holds the whole job, its ``_parts/`` markers what is done. Resuming a
        job whose shards are still queued only duplicates work (markers keep every row once).
        """
        out = normalize_out(out)
        try:
            spec = storage.read_job(out)
        except FileNotFoundError:
            raise JobNotFound(f"no embedfleet job at {out!r}: it holds no _job.json") from None
        return self._enqueue(spec, out)

    def _enqueue(self, spec: JobSpec, out: str) -> JobHandle:
        """Record and send the messages of ``spec``'s shards that have no done-marker yet."""
        model = spec.model
        markers = storage.read_markers(out)
        done = _reopen_failed(out, markers)
        queue = queue_name(spec.kind, model)
        declare_queue(self.app, queue)
        attempt = uuid.uuid4().hex[:8]  # a new submission gets fresh delivery counts
        messages = {}
        for shard in spec.shards:
            if shard.index in done:
                continue
            message = ShardJob(kind=spec.kind, job_id=spec.job_id, model=model, out=out, columns=spec.columns,
                               options=spec.options, shard=shard, n_shards=len(spec.shards))
            messages[shard.index] = {"task_id": f"{spec.job_id}-{shard.index:05d}-{attempt}", "queue": queue,
                                     # fields at their default (signature too) left out: see jobs.wire
                                     "payload": sign(wire(message))}
        record_job(self.app, spec.job_id, messages)  # recorded first: a lost message can be re-sent
        for entry in messages.values():
            self.app.send_task(SHARD_TASK, args=[entry["payload"]], queue=queue, task_id=entry["task_id"],
                               ignore_result=True)
        enqueued = len(messages)
        skipped = [markers[i] for i in done]
        return JobHandle(out, spec.job_id, len(spec.shards), spec.n_rows, enqueued,
                         skipped_rows=sum(r.rows_in for r in skipped), skipped_tokens=sum(r.n_tokens for r in skipped),
                         broker=str(self.app.conf.broker_url), queue=queue)


def plan_corpus(
    source: Any,
    out: str,
    model: str = DEFAULT_MODEL,
    kind: JobKind | str = JobKind.embed,
    text_column: str = "text",
    id_column: str | None = None,
    query_column: str = "query",
    document_column: str = "document",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    options: Options | None = None,
    image_column: str | None = None,
) -> JobSpec:
    """Check a corpus, split it into shards and record the job in ``{out}/_job.json``.

    No broker is involved: a fleet then enqueues the shards (``Client.submit_corpus``), and an
    AWS Batch array job processes them by index with no broker at all. ``out`` is taken without
    its trailing slash; ``id_column`` defaults to the input's ``id`` column when it has one.
    """
    kind = JobKind(kind)
    options = options or Options()
    out = normalize_out(out)
    uri = _materialize(source, out)
    fmt = sources.detect_format(uri)
    if id_column is None:
        id_column = sources.default_id_column(uri, fmt)
    if image_column is not None and kind != JobKind.embed:
        raise BadInput(f"image_column: images are embedded, not {kind.value}ed", param="image_column")
    columns = Columns(text=text_column, id=id_column, query=query_column, document=document_column, image=image_column)
    sources.check_columns(uri, fmt, kind, columns)
    n_rows = sources.count_rows(uri, fmt)
    shards = sources.plan_shards(uri, fmt, n_rows, shard_rows)
    job_id = stable_job_id(
        {"source": uri, "out": out, "model": model, "kind": kind.value, "columns": columns.model_dump(exclude={"image"} if columns.image is None else None),
         # outputs left out unless named, so a job planned before outputs existed keeps its id
         "options": options.model_dump(exclude={"outputs"} if options.outputs is None else None),
         "shard_rows": shard_rows, "n_rows": n_rows,
         # the content too: a corpus edited in place is another job, never the old vectors
         "content": sources.fingerprint(uri, fmt)}
    )
    spec = JobSpec(job_id=job_id, kind=kind, model=model, source=uri, out=out, columns=columns,
                   options=options, n_rows=n_rows, shards=shards)
    _record(spec)
    return spec


def _reopen_failed(out: str, markers: dict[int, ShardReport]) -> set[int]:
    """Shards parked by an earlier run get another chance: drop their markers and the stale
    partial manifest. Done shards stay done (their markers are the proof)."""
    failed = [index for index, report in markers.items() if report.status != "done"]
    if not failed:
        return set(markers)
    root = storage.locate(out)
    storage.delete(root.child(MANIFEST))
    for index in failed:
        storage.delete(root.child(PARTS_DIR).child(marker_name(index)))
    return {index for index, report in markers.items() if report.status == "done"}


def _materialize(source: Any, out: str) -> str:
    """A DataFrame or Table is written next to the outputs, so shards can reference it."""
    if isinstance(source, str):
        return source
    if hasattr(source, "to_parquet") and not isinstance(source, pa.Table):  # pandas
        source = pa.Table.from_pandas(source, preserve_index=False)
    if isinstance(source, pa.Table):
        loc = storage.locate(out).child("_input.parquet")
        storage.publish_table(loc, source)
        return loc.uri
    raise BadInput(f"source must be a path/URI, a pandas DataFrame or a pyarrow Table, not {type(source).__name__}",
                   param="source")


def _record(spec: JobSpec) -> None:
    """Write ``_job.json``; a different job already in ``out`` is an error, the same one is fine."""
    root = storage.locate(spec.out)
    try:
        storage.ensure_dir(root)
    except (FileExistsError, NotADirectoryError):
        raise OutputConflict(f"--out {spec.out}: a file is in the way; an output folder is needed", param="out") from None
    job_file = root.child(JOB_FILE)
    if storage.exists(job_file):
        existing = storage.read_job(spec.out)
        if existing.job_id != spec.job_id:
            raise OutputConflict(
                f"{spec.out} already holds job {existing.job_id} (another corpus, model or options); "
                "choose another output folder"
            )
        return
    if storage.exists(root.child(SUCCESS)):
        raise OutputConflict(f"{spec.out} already holds finished output; choose another output folder")
    storage.publish_json(job_file, spec.model_dump(mode="json"))

