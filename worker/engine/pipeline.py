"""The engine: tokenize -> schedule -> forward -> postprocess, overlapped, shared by all tasks.

(Images of image-text models take their own lane beside this path: ``worker.engine.images``.)

* Requests are validated per item against ``producer.rules`` (a bad item fails alone, with a
  reason that names no position: callers add ``input[3]`` or ``row 17``) and tokenized in
  chunks of ``TOKENIZE_CHUNK`` on a thread pool, one call to the Rust tokenizer's batch API per
  chunk (it spreads over the cores outside the GIL, so this overlaps with the device). A GPU
  engine on enough cores hands its chunks to tokenizer processes instead
  (``worker.engine.tokenizing``), so the tokenizer's per-text Python work leaves this process.
  Small calls (at most one chunk of texts) that arrive while the tokenize threads are busy wait
  together and go through one tokenizer call and one hand-over to the scheduler (no delay at low
  load: the first finds a thread free); each keeps its own block, options and group.
* The host path is columnar: a chunk's tokens stay flat numpy arrays (``Tokens``) from the
  tokenizer to the batch; the scheduler works on arrays of lengths; a batch is one gather
  (``worker.engine.packing``) into the backend's (pinned) buffer; results go back into each
  request's output array by slices. Nothing on the hot path makes a Python object per input.
* The batch budget is the engine's: ``worker.engine.memory`` sizes it for the backend.
* One device thread owns the model. A preparer thread forms the next batch and pads it (or
  packs it into pinned memory, for unpadded backends) while the current one runs.
* Results are copied back and post-processed on a small pool, then put back in input order.
* A request nobody waits for any more is not computed: past its deadline (``submit(deadline=)``,
  ``time.monotonic()``) or with its future cancelled (the caller went away), its remaining items
  are dropped when the next batch is formed and its chunks not yet tokenized are skipped; it
  fails with ``TimedOut`` (``stats["dropped"]`` counts the items). Requests share the urgent lane
  fairly (``worker.engine.scheduler``): a small call is not queued behind a large one.
* Out-of-memory splits a batch in halves (never retried whole); a single input that still does
  not fit fails alone. Non-finite outputs are recomputed in a wider type; if still not finite,
  the item fails with a clear message: a NaN never leaves the worker.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from producer.errors import BadInput, EngineStopped, TimedOut, UnsupportedModel
from producer.jobs import JobKind, Options
from producer.outputs import DENSE_ONLY, MultiVectors, SparseRows
from producer.rules import MAX_INPUT_CHARS, dimensions_problem, pair_problem, text_problem, token_ids_problem
from producer.settings import settings
from worker.backends.base import Backend, Batch, BatchOutputs
from worker.engine import memory
from worker.engine.images import ImageLane
from worker.engine import packing
from worker.engine.tokenizing import PROCESS_CHUNK, TokenizerProcesses, default_processes
from worker.engine.scheduler import Incoming, Picked, Scheduler
from worker.models.tokenizer import BatchTokenizer, Tokens
from worker.models.heads import class_probabilities, finish_embeddings, rerank_scores, top_k_sparse
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: Inputs per tokenizer call for each core (``Engine(tokenize_chunk=)`` defaults to this times the
#: cores, at most ``MAX_TOKENIZE_CHUNK``). Each chunk is one batch call to the Rust tokenizer,
#: which spreads it over the cores; its result stays columnar. Small chunks let the device start
#: on a large request's first chunk at once; large ones amortize the per-call cost when many cores
#: share a call. Measured (short texts, engine with no maths): on 2 cores 64-128 beat 1024 (by up
#: to 2x) and matched or beat the previous engine; on the H200 machine's 16 cores, 1024 beat 64 by
#: 30% (MiniLM and BERT-base, end to end).
TOKENIZE_CHUNK = 64
MAX_TOKENIZE_CHUNK = 2048

#: What ``submit`` uses when it is given no options: built once instead of one pydantic
#: validation per call (about 1 µs measured at stop 27 on the 2-core Zen 4, not the 40 µs the
#: stop-26 note guessed). The engine only reads options (nothing in the package assigns to an
#: ``Options`` field), so one instance is safe to share.
DEFAULT_OPTIONS = Options()


def default_tokenize_chunk() -> int:
    """``TOKENIZE_CHUNK`` per core this process may use, within ``MAX_TOKENIZE_CHUNK``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return min(MAX_TOKENIZE_CHUNK, TOKENIZE_CHUNK * max(1, cores))


@dataclass
class EngineResult:
    """Per-input outputs in input order; rows of failed inputs are zero and ``errors`` holds why
    (a reason without any position: the caller says ``input[3]`` or ``row 17``)."""

    kind: JobKind
    values: np.ndarray
    n_tokens: list[int]
    truncated: list[bool]
    errors: dict[int, str]
    labels: tuple[str, ...] = ()
    #: embed: the outputs computed; ``values`` is ``[n, 0]`` when dense was not asked for
    outputs: tuple[str, ...] = DENSE_ONLY
    sparse: SparseRows | None = None
    multivector: MultiVectors | None = None

    @property
    def ok(self) -> list[bool]:
        return [i not in self.errors for i in range(len(self.n_tokens))]


@dataclass(eq=False)
class _Request:
    size: int
    options: Options
    future: Future
    urgent: bool = False
    outputs: tuple[str, ...] = DENSE_ONLY
    raw: np.ndarray | None = None
    sparse: list[tuple[np.ndarray, np.ndarray] | None] | None = None
    multivector: list[np.ndarray | None] | None = None
    n_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    errors: dict[int, str] = field(default_factory=dict)
    remaining: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: ``time.monotonic()`` past which nobody waits for the answer (infinity: no deadline)
    deadline: float = math.inf
    #: the scheduler's name for this request (its blocks share the device as one request)
    group: int = 0
    #: whether the caller withdrew the call by other means than cancelling the future (a revoke)
    withdrawn: Callable[[], bool] | None = None

    def gone(self) -> bool:
        """The caller cancelled the future, or withdrew the call."""
        return self.future.cancelled() or (self.withdrawn is not None and self.withdrawn())

    def unwanted(self) -> bool:
        """Nobody waits for this request any more: its caller went away, or its deadline passed."""
        return self.gone() or time.monotonic() > self.deadline


@dataclass(eq=False)
class _Block:
    """One tokenized chunk of a request: row ``k`` of ``tokens`` is the request's input ``index[k]``."""

    request: _Request
    index: np.ndarray
    tokens: Tokens


class _TokenIds(list):
    """An input given as token ids (OpenAI clients may send these instead of text)."""


def _all_finite(output: np.ndarray) -> bool:
    """Every value is finite: a finite sum says so (NaN and infinity carry into it), in one pass
    with no temporary, where a boolean copy of the whole output would be a second pass and an
    allocation. A sum that overflows only sends the caller to the exact row check."""
    return bool(np.isfinite(output.sum()))


def _only_str(inputs: Sequence[Any]) -> bool:
    """Every input is a plain ``str`` (one C-level pass over their types): ``_validate_texts`` applies."""
    return bool(inputs) and set(map(type, inputs)) == _STR_ONLY


_STR_ONLY = {str}
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


class Engine:
    """Batches inputs of all concurrent requests for one model on one device."""

    def __init__(
        self,
        info: ModelInfo,
        backend: Backend,
        max_batch_tokens: int | None = None,
        memory_fraction: float | None = None,
        tokenize_workers: int = 2,
        post_workers: int = 1,
        tokenize_chunk: int | None = None,
        tokenize_processes: int | None = None,
        batches_in_flight: int | None = None,
    ) -> None:
        self.info = info
        self.backend = backend
        template = info.pair_template
        self.tokenizer = BatchTokenizer(info.path, info.max_length,
                                        frame=(template.head, template.tail) if template else ("", ""))
        accelerated = backend.asynchronous and not str(backend.device).startswith("cpu")
        processes = default_processes(accelerated) if tokenize_processes is None else tokenize_processes
        #: the tokenizer processes (``worker.engine.tokenizing``), or None: this process's threads tokenize
        self.tokenizer_processes = TokenizerProcesses(self.tokenizer, processes) if processes else None
        if processes:  # one thread per process waits for its chunk, so every process has one
            tokenize_workers = max(tokenize_workers, processes)
        self.tokenize_chunk = max(1, tokenize_chunk or (PROCESS_CHUNK if processes else default_tokenize_chunk()))
        #: Embed and classify inputs may be token ids (the facade asks before sending them).
        self.accepts_token_ids = info.kind != JobKind.rerank
        #: The outputs this engine computes (``producer.outputs``): what the model and backend both offer.
        self.outputs = tuple(o for o in info.outputs if o in backend.outputs) if info.kind == JobKind.embed \
            else DENSE_ONLY
        if info.kind == JobKind.embed and not set(info.default_outputs) <= set(self.outputs):
            raise UnsupportedModel(f"{info.name} gives {', '.join(info.default_outputs)} outputs, which the "
                                   f"{backend.name} backend does not compute; serve it with --backend torch")
        sized = memory.batch_budget(backend, info.revision or info.name, info.max_length, memory_fraction,
                                    cap=max_batch_tokens)
        #: How the batch budget was chosen (printed at start).
        self.budget_report = sized.report
        budget = sized.tokens
        # Short texts must still fill a large budget: allow as many items as 32-token texts take.
        self.scheduler = Scheduler(budget, padded=not backend.unpadded, max_batch_items=max(1024, budget // 32),
                                   dead=lambda block: block.request.gone(), on_dropped=self._dropped,
                                   shared_batch_tokens=None if backend.asynchronous else max(1, budget // 2))
        self._groups = itertools.count()
        self._tokenize_pool = ThreadPoolExecutor(tokenize_workers, thread_name_prefix="ef-tokenize")
        # Small calls waiting to be tokenized together (``_tokenize_small``), and whether a task
        # that will take them is queued on the pool.
        self._small: list[tuple[_Request, list[tuple[int, Any]]]] = []
        self._small_lock = threading.Lock()
        self._small_queued = False
        self._post_pool = ThreadPoolExecutor(post_workers, thread_name_prefix="ef-post")
        self._ready: queue.Queue[tuple[Picked, Batch] | None] = queue.Queue(maxsize=2)
        # Batches formed but not yet launched. An asynchronous backend (CUDA) gets up to four
        # (the ready queue, one waiting to enter it, one waiting for a launch slot: the depth the
        # GPU numbers were measured with), so copies overlap running batches. A synchronous
        # backend (CPU) forms the next batch only once the device is free: forming is cheap
        # there, and an urgent item that arrives meanwhile then makes the very next batch instead
        # of waiting behind batches formed earlier (each can take most of a second on few cores).
        self._formed = threading.Semaphore(4 if backend.asynchronous else 1)
        self._stop = threading.Event()
        # Batches launched but not yet copied back: two keep the GPU busy across the boundary
        # when the host threads get the GIL at once; more give slack against waits for it
        # (``EMBEDFLEET_BATCHES_IN_FLIGHT``; on one stream, activations are not held per batch).
        self.batches_in_flight = batches_in_flight or settings().batches_in_flight
        self._in_flight = threading.Semaphore(self.batches_in_flight)
        self._launched = 0  # batches launched and not yet copied back
        self._launched_lock = threading.Lock()
        self._open: set[_Request] = set()  # requests whose future is not resolved yet
        self._last_done = 0.0  # when the last batch's results were back (``stats["busy_ms"]``)
        self._open_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: image-text models: images go through their own lane (``worker.engine.images``)
        self.images: ImageLane | None = None
        self._preprocess: Callable[[Any], np.ndarray] | None = None
        if "image" in info.modalities:
            from worker.models.vision import Preprocessor

            self._preprocess = Preprocessor(info.path)
            self.images = ImageLane(backend, self._deliver_images, self._fail_indices)
        #: counters; ``busy_ms``: time with a batch on the device (from a launch, or the previous
        #: batch's return, to its results' return): over a job's wall time, how well the host fed it;
        #: ``launch_ms`` / ``launch_cpu_ms``: the device thread's wall / CPU time in launches;
        #: ``wait_ms`` / ``wait_cpu_ms``: the post-processing thread's wall / CPU time waiting for outputs
        self.stats = {"batches": 0, "items": 0, "tokens": 0, "padded_tokens": 0, "oom_splits": 0, "recomputed": 0,
                      "dropped": 0, "busy_ms": 0.0, "launch_ms": 0.0, "launch_cpu_ms": 0.0, "wait_ms": 0.0,
                      "wait_cpu_ms": 0.0}

    @property
    def max_batch_tokens(self) -> int:
        return self.scheduler.max_batch_tokens

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        for target, name in ((self._prepare_loop, "ef-prepare"), (self._device_loop, "ef-device")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.images is not None:
            self.images.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting work, fail what is pending (it goes back to the queue unacked)."""
        self._stop.set()
        self.scheduler.close()
        for block in self.scheduler.drain():
            self._fail_request(block.request, EngineStopped("the worker is stopping"))
        for thread in self._threads:
            thread.join(timeout)
        if self.images is not None:
            self.images.stop(timeout)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._post_pool.shutdown(wait=False, cancel_futures=True)
        if self.tokenizer_processes is not None:
            self.tokenizer_processes.close()
        # Work cancelled in the pools above belongs to requests that would otherwise never end.
        with self._open_lock:
            still_open = list(self._open)
        for request in still_open:
            self._fail_request(request, EngineStopped("the worker is stopping"))
        self.backend.close()

    def warm_up(self) -> float:
        """Run a few batches of made-up texts of growing length, so a device's one-time costs
        (CUDA's lazy kernel loading, cuBLAS heuristics, Triton's compiles for the first shapes;
        ~1 s on the H200) land in the worker's start, not in its first job. Returns the seconds.
        Only asynchronous (CUDA) backends need it; on a CPU it would only cost time.

        The activations' memory is given back to the device afterwards (kernels and library
        workspaces stay: serving needs them): a started worker holds what transformers holds
        after load, not the allocator cache of the largest warm-up batch."""
        started = time.perf_counter()
        if self.tokenizer_processes is not None:
            self.tokenizer_processes.wait_ready()
        if self.info.kind == JobKind.rerank:
            inputs: list[Any] = [("warm", "up " * n) for n in (1, 30, 120, 500)]
        else:
            inputs = ["warm up " * n for n in (1, 30, 120, 500)]
        for copies in (1, 64):
            self.run(inputs * copies, Options(truncate=True), timeout=300)
        device = self.backend.memory_device()
        if device is not None:
            device.release()
        return time.perf_counter() - started

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests
    def submit(self, inputs: Sequence[Any], options: Options | None = None,
               urgent: bool = False, deadline: float | None = None,
               withdrawn: Callable[[], bool] | None = None, tokenize_here: bool = False) -> "Future[EngineResult]":
        """Queue texts (embed, classify) or (query, document) pairs (rerank); returns a future.

        ``urgent`` marks a call someone is waiting on (an HTTP request): its items go into the
        next batch ahead of pending bulk work (see ``Scheduler``). Past ``deadline``
        (``time.monotonic()``), or once the future is cancelled, its remaining items are dropped
        instead of computed and the future fails with ``TimedOut``; so do they once ``withdrawn()``
        says the caller withdrew the call (asked when batches are formed: keep it cheap).

        ``tokenize_here``: a small call is tokenized on the calling thread when no other small call
        waits for the tokenizer (in this process's tokenizer, not in tokenizer processes), instead
        of waking a pool thread for it: for a caller with nothing else to do meanwhile (the inline
        lane with no other call in flight), the pool thread's wake-up on an idle core (70-150 us,
        2-core Zen 5) is time the call waits for nothing."""
        options = DEFAULT_OPTIONS if options is None else options
        self.check_options(options)
        request = _Request(size=len(inputs), options=options, future=Future(), urgent=urgent,
                           outputs=self.outputs_for(options), group=next(self._groups),
                           deadline=math.inf if deadline is None else float(deadline), withdrawn=withdrawn)
        request.n_tokens = np.zeros(len(inputs), dtype=np.int64)
        request.truncated = np.zeros(len(inputs), dtype=bool)
        texts, given, images = self._validate(inputs, options, request)
        request.remaining = len(texts) + len(given) + len(images)
        with self._open_lock:
            self._open.add(request)
        if not request.remaining:
            self._finish(request)
            return request.future
        if texts and len(texts) <= self.tokenize_chunk:
            self._queue_small(request, texts, tokenize_here and self.tokenizer_processes is None)
            texts = []
        for group, as_ids in ((texts, False), (given, True)):
            for start in range(0, len(group), self.tokenize_chunk):
                chunk = group[start : start + self.tokenize_chunk]
                self._tokenize_pool.submit(self._tokenize, request, chunk, as_ids)
        for start in range(0, len(images), 8):
            self._tokenize_pool.submit(self._prepare_images, request, images[start:start + 8])
        return request.future

    def run(self, inputs: Sequence[Any], options: Options | None = None, timeout: float | None = None,
            urgent: bool = False, deadline: float | None = None) -> EngineResult:
        """Submit and wait."""
        return self.submit(inputs, options, urgent, deadline).result(timeout)

    def check_options(self, options: Options) -> None:
        """Raise ``BadInput`` for options this model cannot honour, before any work is queued."""
        if self.info.kind == JobKind.embed:
            problem = dimensions_problem(options.dimensions, self.info.dims)
            if problem is not None:
                raise problem.error("dimensions", "=")
        if options.raw_scores and self.info.kind == JobKind.embed:
            raise BadInput("raw_scores applies to rerank and classify models, not to an embedding model",
                           param="raw_scores")
        self._check_sparse_options(options, self.outputs_for(options))
        self._prefix(options)

    def outputs_for(self, options: Options) -> tuple[str, ...]:
        """The outputs a request gets: those it names, else the model's default; ``BadInput`` for
        one this model (on this backend) does not give."""
        if options.outputs is None:
            return self.info.default_outputs if self.info.kind == JobKind.embed else DENSE_ONLY
        asked = tuple(options.outputs)
        if self.info.kind != JobKind.embed and asked != DENSE_ONLY:
            raise BadInput(f"outputs apply to embedding models; {self.info.name} is {self.info.kind.a_model}",
                           param="outputs")
        missing = [name for name in asked if name not in self.outputs]
        if missing:
            raise BadInput(f"outputs: {self.info.name} does not give {', '.join(missing)} (it gives "
                           f"{', '.join(self.outputs)})", param="outputs")
        return asked

    def _check_sparse_options(self, options: Options, outputs: tuple[str, ...]) -> None:
        if options.max_active_dims is not None and "sparse" not in outputs:
            raise BadInput("max_active_dims prunes sparse vectors; ask for the sparse output "
                           f"(this request gets {', '.join(outputs)})", param="max_active_dims")

    def _prompt(self, options: Options) -> str | None:
        """The prompt that applies: the literal one, the named one, else the model's default (or none)."""
        if options.prompt is not None:
            return options.prompt
        name = options.prompt_name if options.prompt_name is not None else self.info.default_prompt_name
        if name is None:
            return None
        if name not in self.info.prompts:
            known = ", ".join(sorted(self.info.prompts)) or "none"
            raise BadInput(f"prompt_name {name!r} is not defined by the model (it has: {known})", param="prompt_name")
        return self.info.prompts[name]

    def _prefix(self, options: Options) -> str:
        return self._prompt(options) or ""

    def _ids_prompt_reason(self, options: Options) -> str:
        if options.prompt is None and options.prompt_name is None:
            return (f"the model's default prompt ({self.info.default_prompt_name!r}) cannot be put before token ids; "
                    "send text, or set prompt to \"\" to embed the ids without it")
        return "a prompt cannot be put before token ids; send text instead"

    def _pair(self, query: str, document: str, prompt: str | None) -> Any:
        """A cross-encoder's pair (a prompt goes before the query, as sentence-transformers does), or a
        decoder reranker's prompt body (the prompt is its instruction)."""
        template = self.info.pair_template
        if template is not None:
            return template.body(query, document, prompt)
        return ((prompt or "") + query, document)

    def _validate(self, inputs: Sequence[Any], options: Options, request: _Request
                  ) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]], list[tuple[int, Any]]]:
        """The valid inputs, as (index, what to tokenize): texts (or pairs), token-id lists, and
        image references (``{"image": ...}`` inputs of an image-text model)."""
        prompt = self._prompt(options)
        prefix = prompt or ""
        if self.info.kind != JobKind.rerank and _only_str(inputs):
            return self._validate_texts(inputs, prefix, request), [], []
        texts: list[tuple[int, Any]] = []
        given: list[tuple[int, Any]] = []
        images: list[tuple[int, Any]] = []
        for index, value in enumerate(inputs):
            item: Any
            if isinstance(value, dict) and "image" in value and self.info.kind == JobKind.embed:
                if self.images is None:
                    request.errors[index] = (f"an image input, but {self.info.name} embeds text only (images need an "
                                             "image-text model: CLIP, SigLIP)")
                elif request.outputs != DENSE_ONLY:
                    request.errors[index] = "an image gives a dense vector only"
                else:
                    images.append((index, value["image"]))
                continue
            if self.info.kind == JobKind.rerank:
                problem = pair_problem(value)
                item = None if problem else self._pair(value[0], value[1], prompt)
                reason = problem.reason if problem else None
            elif isinstance(value, (list, tuple)):
                problem = token_ids_problem(value, self.tokenizer.vocab_size)
                reason = problem.reason if problem else None
                if reason is None and prefix:
                    reason = self._ids_prompt_reason(options)
                item = _TokenIds(value)
            else:
                problem = text_problem(value)
                reason = problem.reason if problem else None
                item = prefix + value if reason is None else None
            if reason:
                request.errors[index] = reason
            elif isinstance(item, _TokenIds):
                given.append((index, item))
            else:
                texts.append((index, item))
        return texts, given, images

    def _validate_texts(self, inputs: Sequence[str], prefix: str, request: _Request) -> list[tuple[int, str]]:
        """``_validate`` for inputs that are all plain strings (the bulk and short-text path), in a
        few C-level passes instead of a Python loop per text: lengths through numpy, blank texts
        by ``str.isspace`` (blank means ``not text.strip()``: empty, or whitespace only; both use
        the same whitespace table). Only the texts that fail these cheap tests go through
        ``text_problem``, so their reasons are the very ones of the per-item path. Measured (2,048
        short texts, 2-core Zen 4, stop 27): 99 ns a text against 423 for the loop."""
        n = len(inputs)
        lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=n)
        suspect = (lengths == 0) | (lengths > MAX_INPUT_CHARS)
        if any(map(str.isspace, inputs)):
            suspect |= np.fromiter(map(str.isspace, inputs), dtype=bool, count=n)
        values = list(map(prefix.__add__, inputs)) if prefix else inputs
        if not suspect.any():
            return list(zip(range(n), values))
        for index in np.flatnonzero(suspect).tolist():
            problem = text_problem(inputs[index])
            if problem is not None:
                request.errors[index] = problem.reason
        return [(index, values[index]) for index in range(n) if index not in request.errors]

    def _prepare_images(self, request: _Request, chunk: list[tuple[int, Any]]) -> None:
        """Decode and preprocess images on the host pool; each bad one fails alone with its reason."""
        from worker.models.vision import ImageProblem

        assert self._preprocess is not None and self.images is not None
        for index, ref in chunk:
            try:
                pixels = self._preprocess(ref)
            except ImageProblem as exc:
                self._fail_indices(request, [index], str(exc))
                continue
            except Exception as exc:  # a processor failure is this image's, not the request's
                self._fail_indices(request, [index], f"the image could not be preprocessed: {type(exc).__name__}: {exc}")
                continue
            self.images.add(request, index, pixels)

    def _deliver_images(self, request: _Request, index: list[int], values: np.ndarray) -> None:
        finite = np.isfinite(values).all(axis=1)
        with request.lock:
            if request.raw is None:
                request.raw = np.zeros((request.size, values.shape[1]), dtype=np.float32)
            for i, row, ok in zip(index, values, finite):
                if ok:
                    request.raw[i] = row
                else:
                    request.errors[i] = "the image gave non-finite outputs"
        self.stats["items"] += len(index)
        self._complete(request, len(index))

    def _fail_indices(self, request: _Request, index: list[int], reason: str) -> None:
        with request.lock:
            for i in index:
                request.errors[i] = reason
        self._complete(request, len(index))

    def _tokenize(self, request: _Request, chunk: list[tuple[int, Any]], as_ids: bool) -> None:
        """One tokenizer call for the chunk; its rows go to the scheduler as one block."""
        if request.unwanted():
            self._drop(request, len(chunk))
            return
        index = np.fromiter(map(_FIRST, chunk), dtype=np.int64, count=len(chunk))  # C-level passes: 62
        values = list(map(_SECOND, chunk))  # instead of 79 ns a text with a generator (2-core Zen 4)
        tokenizer: Any = self.tokenizer_processes or self.tokenizer
        try:
            tokens = tokenizer.encode_ids_tokens(values) if as_ids else tokenizer.encode_tokens(values)
        except Exception as exc:  # a tokenizer bug must fail the request, not hang it
            log.exception("tokenization failed")
            self._fail_request(request, exc)
            return
        rows = self._admit(request, index, tokens.lengths, tokens.truncated)
        if rows.size:
            self._schedule([Incoming(tokens.lengths[rows], _Block(request, index, tokens), rows, request.urgent,
                                     request.group, None if math.isinf(request.deadline) else request.deadline)])

    def _queue_small(self, request: _Request, texts: list[tuple[int, Any]], here: bool = False) -> None:
        """Tokenize a small call's texts together with the other small calls waiting.

        Adaptive, with no delay: the first call finds no task queued and queues one, which a free
        pool thread starts at once; calls arriving while every pool thread is busy wait for that
        task and go in its one tokenizer call. Under load many single-text calls become one call
        to the Rust tokenizer and one hand-over to the thread forming batches, instead of one of
        each per call (measured with bench/engine_cycle.py: each took its own thread wake-ups,
        a tokenizer call and a scheduler wake-up)."""
        with self._small_lock:
            self._small.append((request, texts))
            if self._small_queued:
                return
            self._small_queued = True
        if here:  # ``submit``'s ``tokenize_here``: this thread takes what waits, as a pool thread would
            self._tokenize_small()
        else:
            self._tokenize_pool.submit(self._tokenize_small)

    def _take_small(self) -> list[tuple[_Request, list[tuple[int, Any]]]]:
        """The small calls waiting, up to one chunk of texts (at least one call); a task for the
        rest is queued."""
        with self._small_lock:
            taken = count = 0
            for taken, (_, texts) in enumerate(self._small, 1):
                count += len(texts)
                if count >= self.tokenize_chunk:
                    break
            pending, self._small = self._small[:taken], self._small[taken:]
            self._small_queued = again = bool(self._small)
        if again:
            self._tokenize_pool.submit(self._tokenize_small)
        return pending

    def _tokenize_small(self) -> None:
        """The waiting small calls' texts in one tokenizer call, into the scheduler at once.

        The calls' rows share one ``Tokens`` and one index (each call's block names its own rows),
        so nothing is copied apart. Options never mix: each call keeps its own block, request and
        group (prompts were applied to its texts before, truncation is judged per call here)."""
        wanted = []
        for request, texts in self._take_small():
            if request.unwanted():
                self._drop(request, len(texts))
            else:
                wanted.append((request, texts))
        if not wanted:
            return
        values = [value for _, texts in wanted for _, value in texts]
        tokenizer: Any = self.tokenizer_processes or self.tokenizer
        try:
            tokens = tokenizer.encode_tokens(values)
        except Exception:  # each call alone: a tokenizer failure is one call's, not its neighbours'
            for request, texts in wanted:
                self._tokenize(request, texts, False)
            return
        index = np.fromiter((i for _, texts in wanted for i, _ in texts), dtype=np.int64, count=len(values))
        lengths, truncated = tokens.lengths, tokens.truncated
        blocks, start = [], 0
        for request, texts in wanted:
            part = slice(start, start + len(texts))
            rows = self._admit(request, index[part], lengths[part], truncated[part]) + start
            start = part.stop
            if rows.size:
                blocks.append(Incoming(lengths[rows], _Block(request, index, tokens), rows, request.urgent,
                                       request.group, None if math.isinf(request.deadline) else request.deadline))
        self._schedule(blocks)

    def _admit(self, request: _Request, index: np.ndarray, lengths: np.ndarray, truncated: np.ndarray) -> np.ndarray:
        """Record the token counts of a request's tokenized inputs (``index``); the positions (into
        these arrays) of those that run. Cut inputs fail here unless the request allows truncation."""
        request.n_tokens[index] = lengths
        request.truncated[index] = truncated
        if request.options.truncate or not truncated.any():
            return np.arange(index.shape[0], dtype=np.int64)
        rejected = np.flatnonzero(truncated)
        reason = f"longer than the model's maximum of {self.info.max_length} tokens (set truncate=true to cut it)"
        with request.lock:
            for i in index[rejected].tolist():
                request.errors[i] = reason
        self._complete(request, int(rejected.size))
        return np.flatnonzero(~truncated)

    def _schedule(self, blocks: list[Incoming]) -> None:
        """Blocks into the scheduler in one step; their requests fail if the engine is stopping."""
        if not blocks:
            return
        try:
            self.scheduler.add_many(blocks)
        except EngineStopped as exc:
            for block in blocks:
                self._fail_request(block.owner.request, exc)

    def _dropped(self, block: _Block, rows: np.ndarray) -> None:
        """The scheduler dropped these rows of a block (deadline passed, or the caller cancelled)."""
        self._drop(block.request, int(rows.size))

    def _drop(self, request: _Request, count: int) -> None:
        """``count`` items of an unwanted request are not computed; the request fails (once)."""
        self.stats["dropped"] += count
        if not request.future.done():
            log.info("dropping %d items of a request past its deadline", count)
        self._fail_request(request, TimedOut("the request's deadline passed before all its inputs ran; the rest "
                                             "was dropped", code="timeout"))

    # ------------------------------------------------------------------ device side
    def _collate(self, picked: Picked) -> Batch:
        if self.backend.unpadded:
            return packing.pack(picked, self.backend.host_buffer)
        return packing.pad(picked, self.tokenizer.pad_id)

    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            if not self._formed.acquire(timeout=0.2):
                continue
            if not self._form_batch():
                self._formed.release()

    def _form_batch(self) -> bool:
        """Take a batch from the scheduler and hand it to the device loop; False if none was."""
        slots = self.scheduler.next_batch(timeout=0.2, wanted=self._device_wants if self.backend.asynchronous else None)
        if not slots:
            return False
        try:
            batch = self._collate(slots)
        except Exception as exc:
            self._fail_slots(slots, exc)
            return False
        while not self._stop.is_set():
            try:
                self._ready.put((slots, batch), timeout=0.2)
                return True
            except queue.Full:
                continue
        self._fail_slots(slots, EngineStopped("the worker is stopping"))
        return False

    def _device_wants(self) -> bool:
        """An asynchronous device would launch a batch now: none formed waits for it and a launch
        slot is free. Until then a batch that does not fill the budget is not formed, so the
        requests arriving while the device runs join it instead of queueing as small batches,
        each paying the launch's fixed CPU cost (on a GPU, concurrent single-text calls otherwise
        became batches of a few items). Full batches are formed ahead as before."""
        return self._ready.qsize() == 0 and self._launched < self.batches_in_flight

    def _launch_count(self, change: int) -> None:
        with self._launched_lock:
            self._launched += change
        if change < 0:
            self.scheduler.poke()

    def _device_loop(self) -> None:
        while not self._stop.is_set():
            try:
                work = self._ready.get(timeout=0.2)
            except queue.Empty:
                continue
            if work is None:
                break
            slots, batch = work
            if self.backend.asynchronous:
                self.scheduler.poke()  # the next batch may form while this one launches
            try:
                self._run_batch(slots, batch)
            finally:
                self._formed.release()
        while True:  # fail whatever was prepared but not run
            try:
                work = self._ready.get_nowait()
            except queue.Empty:
                break
            if work:
                self._fail_slots(work[0], EngineStopped("the worker is stopping"))

    def _run_batch(self, slots: Picked, batch: Batch) -> None:
        """Launch a batch; a post-processing thread waits for it, so launches run ahead."""
        while not self._in_flight.acquire(timeout=0.2):
            if self._stop.is_set():
                self._fail_slots(slots, EngineStopped("the worker is stopping"))
                return
        launched, cpu = time.perf_counter(), time.thread_time()
        requests = {block.request for block in slots.owners}
        wanted = tuple(o for o in self.outputs if any(o in request.outputs for request in requests))
        try:
            wait: Callable[[], Any] = self.backend.launch(batch) if wanted == DENSE_ONLY \
                else self.backend.launch_outputs(batch, wanted)
            self._count_launch(launched, cpu)
        except Exception as exc:
            self._in_flight.release()
            if self.backend.is_out_of_memory(exc):
                self._split_after_oom(slots, exc)
            else:
                log.exception("forward failed on a batch of %d", len(slots))
                self._fail_slots(slots, exc)
            return
        self._launch_count(1)
        self.stats["batches"] += 1
        self.stats["items"] += len(slots)
        self.stats["tokens"] += batch.n_real_tokens
        self.stats["padded_tokens"] += int(batch.input_ids.size)
        self._post_pool.submit(self._complete_batch, slots, batch, wait, launched)

    def _complete_batch(self, slots: Picked, batch: Batch, wait: Callable[[], Any], launched: float = 0.0) -> None:
        waited, cpu = time.perf_counter(), time.thread_time()
        try:
            output = wait()
        except Exception as exc:  # a device error surfacing at the copy back
            log.exception("a batch of %d failed on the device", len(slots))
            self._fail_slots(slots, exc)
            return
        finally:
            self._count_wait(waited, cpu)
            self._in_flight.release()
            self._launch_count(-1)
            self._count_busy(launched)
        if isinstance(output, BatchOutputs):
            self._deliver_outputs(slots, self._fix_non_finite_outputs(slots, output))
            return
        if _all_finite(output):  # the usual case: one pass over the outputs, no recompute, no row check
            self._deliver(slots, output, finite=True)
            return
        self._deliver(slots, self._fix_non_finite(slots, batch, output))

    def _count_launch(self, launched: float, cpu: float) -> None:
        """Add the launch's wall time (``launch_ms``) and this thread's CPU time in it
        (``launch_cpu_ms``). Why both: on a GPU the launch is Python (one call per kernel), so
        wall time well above CPU time means the device thread waited, for the GIL or a blocking
        CUDA call, while the device may have run dry (issue 13: bulk batches ran slower in a
        worker than in the bare engine)."""
        self.stats["launch_ms"] += 1000 * (time.perf_counter() - launched)
        self.stats["launch_cpu_ms"] += 1000 * (time.thread_time() - cpu)

    def _count_wait(self, waited: float, cpu: float) -> None:
        """Add the wait for a batch's outputs: wall (``wait_ms``) and this thread's CPU in it
        (``wait_cpu_ms``). Why: CUDA's default event synchronization spins, so a thread waiting
        for the device burns a core for as long as the batch runs. That CPU is in the engine
        process's CPU time but holds no GIL, so it must be taken out before that time is read as
        host work a text (stop 27 read 8.4 µs a short text as the engine's limit)."""
        self.stats["wait_ms"] += 1000 * (time.perf_counter() - waited)
        self.stats["wait_cpu_ms"] += 1000 * (time.thread_time() - cpu)

    def _count_busy(self, launched: float) -> None:
        """Add this batch's device time to ``busy_ms``: batches return in launch order (one
        post-processing thread), so overlapping ones are counted once. A return noticed late (the
        thread still delivering the previous batch) counts as busy: an upper bound."""
        done = time.perf_counter()
        self.stats["busy_ms"] += 1000 * (done - max(launched, self._last_done))
        self._last_done = done

    def _split_after_oom(self, slots: Picked, error: BaseException) -> None:
        if len(slots) == 1:
            self._fail_item(slots, f"this input ({int(slots.lengths[0])} tokens) does not fit in device memory on "
                                   "its own")
            return
        self.stats["oom_splits"] += 1
        half = len(slots) // 2
        log.warning("out of memory on a batch of %d; splitting into %d + %d", len(slots), half, len(slots) - half)
        for part in (slots.take(slice(0, half)), slots.take(slice(half, None))):
            self._run_batch(part, self._collate(part))

    def _fix_non_finite(self, slots: Picked, batch: Batch, output: np.ndarray) -> np.ndarray:
        bad_rows = np.flatnonzero(~np.isfinite(output).all(axis=1))
        if bad_rows.size == 0:
            return output
        self.stats["recomputed"] += int(bad_rows.size)
        log.warning("%d non-finite outputs in %s; recomputing them in a wider type", bad_rows.size, self.backend.dtype)
        subset = slots.take(bad_rows)
        try:
            redo = self.backend.forward(self._collate(subset), precise=True)
        except Exception as exc:  # the recompute itself failed: those items fail, nothing else
            redo = np.full((len(subset), output.shape[1]), np.nan, dtype=np.float32)
            log.warning("recompute failed: %s", exc)
        output = output.copy()
        output[bad_rows] = redo
        return output

    def _fix_non_finite_outputs(self, slots: Picked, output: BatchOutputs) -> BatchOutputs:
        """``_fix_non_finite`` for several outputs: bad inputs are recomputed in a wider type, each
        output of theirs replaced; still bad ones are left for ``_deliver_outputs`` to fail."""
        bad_rows = np.flatnonzero(~output.finite_rows())
        if bad_rows.size == 0:
            return output
        self.stats["recomputed"] += int(bad_rows.size)
        subset = slots.take(bad_rows)
        wanted = tuple(name for name in self.outputs if getattr(output, name) is not None)
        try:
            redo = self.backend.launch_outputs(self._collate(subset), wanted, precise=True)()
        except Exception as exc:  # the recompute itself failed: those items fail, nothing else
            log.warning("recompute failed: %s", exc)
            return output
        for name in wanted:
            rows, fixed = getattr(output, name), getattr(redo, name)
            if isinstance(rows, np.ndarray):
                rows = rows.copy()
            for position, row in enumerate(bad_rows):
                rows[row] = fixed[position]
            setattr(output, name, rows)
        return output

    # ------------------------------------------------------------------ results
    def _deliver_outputs(self, slots: Picked, output: BatchOutputs) -> None:
        """Several outputs per input: dense rows by index as in ``_deliver``; sparse rows and
        multi-vectors are lists (one entry an input), placed one by one."""
        finite = output.finite_rows()
        for block, part, rows in slots.groups():
            request: _Request = block.request
            index, ok = block.index[rows], finite[part]
            positions = np.arange(part.start, part.stop)[ok]
            kept = index[ok]
            with request.lock:
                if output.dense is not None and "dense" in request.outputs and request.raw is None:
                    request.raw = np.zeros((request.size, output.dense.shape[1]), dtype=np.float32)
                if "sparse" in request.outputs and request.sparse is None:
                    request.sparse = [None] * request.size
                if "multivector" in request.outputs and request.multivector is None:
                    request.multivector = [None] * request.size
                for i in index[~ok].tolist():
                    request.errors[i] = "gave non-finite outputs even in a wider type"
                if request.raw is not None and output.dense is not None:
                    request.raw[kept] = output.dense[positions]
                for mine, theirs in ((request.sparse, output.sparse), (request.multivector, output.multivector)):
                    if mine is not None and theirs is not None:
                        for position, i in zip(positions.tolist(), kept.tolist()):
                            mine[i] = theirs[position]
            self._complete(request, len(rows))

    def _deliver(self, slots: Picked, output: np.ndarray, finite: bool = False) -> None:
        """Each block's slice of the output into its request's array, by index (no loop per row).
        ``finite``: the caller saw every value finite (``_all_finite``), so none is checked again;
        else the rows that are not fail alone."""
        finite = None if finite or _all_finite(output) else np.isfinite(output).all(axis=1)
        for block, part, rows in slots.groups():
            request: _Request = block.request
            index, values = block.index[rows], output[part]
            ok = None if finite is None else finite[part]
            with request.lock:
                if request.raw is None:
                    request.raw = np.zeros((request.size, output.shape[1]), dtype=np.float32)
                if ok is None or ok.all():
                    request.raw[index] = values
                else:
                    request.raw[index[ok]] = values[ok]
                    for i in index[~ok].tolist():
                        request.errors[i] = "gave non-finite outputs even in a wider type"
            self._complete(request, len(rows))

    def _complete(self, request: _Request, count: int) -> None:
        with request.lock:
            request.remaining -= count
            done = request.remaining <= 0
        if done:
            self._finish(request)

    def _finish(self, request: _Request) -> None:
        with self._open_lock:
            self._open.discard(request)
        if request.future.done():
            return
        try:
            request.future.set_result(self._result(request))
        except Exception as exc:
            request.future.set_exception(exc)

    def _result(self, request: _Request) -> EngineResult:
        options = request.options
        raw = request.raw if request.raw is not None else np.zeros((request.size, self.info.dims), np.float32)
        if self.info.kind == JobKind.embed:
            values = finish_embeddings(raw, self.normalizes(options), options.dimensions, in_place=True)  # ours
        elif self.info.kind == JobKind.rerank:
            values = rerank_scores(raw, options.raw_scores)
        elif options.raw_scores:
            values = raw.astype(np.float32, copy=True)
        else:
            values = class_probabilities(raw, self.info.multi_label)
        for index in request.errors:
            values[index] = 0
        result = EngineResult(
            kind=self.info.kind,
            values=values,
            n_tokens=request.n_tokens.tolist(),
            truncated=request.truncated.tolist(),
            errors=dict(sorted(request.errors.items())),
            labels=self.info.labels,
            outputs=request.outputs,
        )
        return self._other_outputs(request, result) if request.outputs != DENSE_ONLY else result

    def _other_outputs(self, request: _Request, result: EngineResult) -> EngineResult:
        """Sparse rows and multi-vectors in input order (a failed input gets an empty row); dense
        values only when asked for (``[n, 0]`` otherwise)."""
        if "dense" not in request.outputs:
            result.values = np.zeros((request.size, 0), dtype=np.float32)
        failed = request.errors
        if "sparse" in request.outputs:
            empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
            rows = request.sparse or [None] * request.size
            k = request.options.max_active_dims
            result.sparse = SparseRows.from_pairs(
                [empty if i in failed or row is None else top_k_sparse(*row, k) for i, row in enumerate(rows)],
                self.info.vocab_size)
        if "multivector" in request.outputs:
            dims = self.info.multivector_dims
            rows_mv = request.multivector or [None] * request.size
            result.multivector = MultiVectors.from_arrays(
                [np.zeros((0, dims), np.float32) if i in failed or row is None else row
                 for i, row in enumerate(rows_mv)], dims)
        return result

    def normalizes(self, options: Options) -> bool:
        """Whether vectors leave L2-normalized: as asked, else the model's files say; and always
        after a Matryoshka cut, unless the caller said no (a cut vector is not unit length)."""
        if options.normalize is not None:
            return options.normalize
        truncates = options.dimensions is not None and options.dimensions < self.info.dims
        return self.info.normalize or truncates

    def _fail_item(self, slots: Picked, message: str) -> None:
        """Fail the single input of a one-item batch alone."""
        block = slots.owners[0]
        with block.request.lock:
            block.request.errors[int(block.index[slots.rows[0]])] = message
        self._complete(block.request, 1)

    def _fail_slots(self, slots: Picked, error: BaseException) -> None:
        for request in {block.request for block in slots.owners}:
            self._fail_request(request, error)

    def _fail_request(self, request: _Request, error: BaseException) -> None:
        with self._open_lock:
            self._open.discard(request)
        if not request.future.done():
            try:
                request.future.set_exception(error)
            except Exception:  # resolved meanwhile by another thread: that answer stands
                pass

