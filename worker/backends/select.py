"""Which backend runs a model: by name, or measured here at start (``--backend auto``).

``load_backend`` is the one entry point: it builds a named backend (imported only when asked
for, so a worker without onnxruntime or the Neuron SDK still runs torch, and a missing one says
what to install), or, for ``auto`` on a CPU, measures the candidates and keeps the fastest that
passes the quality gate. It returns a ``Selection``: the backend and the table of what was tried.

Why measure instead of a rule: which stack wins depends on the CPU's units (AMX, AVX-512-BF16,
VNNI), the model's shapes and the libraries installed, and rules of thumb go stale. So the worker
runs every candidate on a short deterministic sample (timed: retrieval-shaped texts of the mixed
workload's lengths), compares each one's outputs with torch fp32 on real prose
(``worker.backends.quality``: embeddings are of equal quality when recall@10 against fp32 >= 0.97
and every cosine >= 0.99; rerank/classify: every score within 0.01), keeps the fastest of the
equal-quality ones, and logs the table. ``--dtype`` narrows the candidates to that dtype, and
then the fastest of them runs even under the gate (the dtype asked for is the dtype used; the
reason says it is under the gate); an explicit backend other than ``auto`` skips the selection. On GPUs ``auto`` is the torch backend (bf16
where supported): its CUDA path is the fastest measured there (bench/RESULTS.md).

The choice is measured once per model revision, machine (CPU model, its matrix units, the
cores this process may use) and library versions, and cached under the settings' cache root
(``backend-choices.json``): the same command then gets the same backend and dtype every time
(timings on a shared machine differ between runs by more than close candidates do), and a
small job does not spend its first seconds timing. ``Selection.reason`` says what was chosen
and why, measured now or cached.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from producer.errors import BadInput
from producer.jobs import JobKind
from producer.settings import cache_dir, settings
from worker.backends.base import (Backend, BackendUnavailable, Batch, Recipe, canonical_dtype, cpu_threads,
                                  sorted_batches)
from worker.backends.quality import (COSINE_GATE, QUALITY_TEXTS, RECALL_GATE, SCORE_TOLERANCE, agreement, cosines,
                                     prose)
from worker.models.heads import class_probabilities, rerank_scores

if TYPE_CHECKING:
    from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

SAMPLE_TEXTS = 64

#: name -> (module, class, what to install when the import fails)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("worker.backends.torch", "TorchBackend", "pip install torch"),
    "onnx": ("worker.backends.onnx", "OnnxBackend", "pip install 'embedfleet[onnx]'"),
    "openvino": ("worker.backends.openvino", "OpenVinoBackend", "pip install 'embedfleet[openvino]'"),
    "neuron": ("worker.backends.neuron", "NeuronBackend", "pip install 'embedfleet[neuron]' on an inf2 instance"),
}


def backend_class(name: str) -> type[Backend]:
    """The class implementing backend ``name``; unknown or missing ones fail with what to do."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}", param="backend")
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(f"backend {name!r} is not implemented in this version of embedfleet") from exc
        raise BackendUnavailable(f"backend {name!r} needs the package {exc.name!r}: {install}") from exc
    return getattr(module, class_name)  # type: ignore[no-any-return]


def build(recipe: Recipe) -> Backend:
    """A backend from its recipe (also how another process builds the same one)."""
    backend = backend_class(recipe.backend)(recipe.info, device=recipe.device, dtype=recipe.dtype,
                                            **dict(recipe.options))
    backend.recipe = recipe
    return backend


@dataclass(frozen=True)
class Candidate:
    """One backend/dtype pair to try."""

    backend: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.backend}/{self.dtype}"


@dataclass
class Trial:
    """What one candidate measured: speed, agreement with fp32, and whether it passed."""

    candidate: Candidate
    tokens_per_s: float = 0.0
    cos_min: float = float("nan")
    cos_mean: float = float("nan")
    max_score_diff: float = float("nan")
    passed: bool = False
    error: str = ""
    #: recall@10 against fp32 on the quality sample (embeddings only).
    recall: float = float("nan")


# ---------------------------------------------------------------------------------- candidates
def resolve_device(device: str) -> str:
    """The device the candidates run on (``auto`` as the torch backend resolves it)."""
    from worker.backends.torch import pick_device

    return pick_device(device)


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(device: str, dtype: str = "auto") -> list[Candidate]:
    """Backend/dtype pairs worth trying on ``device``; an explicit ``dtype`` keeps only its own."""
    found: list[Candidate] = [Candidate("torch", "float32")]
    if device.startswith("cpu"):
        from worker.backends.torch_cpu import bf16_native, fp16_native

        if bf16_native():
            found.append(Candidate("torch", "bfloat16"))
        if fp16_native():
            found.append(Candidate("torch", "float16"))
        if _onnx_available():
            found += [Candidate("onnx", "float32"), Candidate("onnx", "int8")]
        if _openvino_available():
            from worker.backends.openvino_int8 import int8_native

            found.append(Candidate("openvino", "float32"))
            if bf16_native():
                found.append(Candidate("openvino", "bfloat16"))
            if int8_native():
                found.append(Candidate("openvino", "int8"))
    else:
        found += [Candidate("torch", "bfloat16"), Candidate("torch", "float16")]
        if _onnx_available():
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and device.startswith("cuda"):
                found.append(Candidate("onnx", "float32"))
    wanted = canonical_dtype(dtype)
    if wanted == "auto":
        return found
    kept = [c for c in found if c.dtype == wanted]
    if not kept:
        offered = ", ".join(str(c) for c in found)
        raise BadInput(f"--backend auto --dtype {dtype}: no backend runs {wanted} on {device} here "
                       f"(candidates: {offered})", param="dtype")
    return kept


# ---------------------------------------------------------------------------------- sample
def sample_inputs(info: "ModelInfo", n: int = SAMPLE_TEXTS, seed: int = 0) -> list[Any]:
    """Deterministic retrieval-shaped inputs from the model's own vocabulary (pairs for rerank).

    30% short queries, 70% passages of 40-300 words, like the mixed benchmark workload, so the
    measured speed reflects the batch shapes a worker actually sees.
    """
    from worker.models.tokenizer import BatchTokenizer

    vocab = BatchTokenizer(info.path, info.max_length)._tokenizer.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2) or sorted(vocab)
    rng = np.random.default_rng(seed)

    def text(length: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), size=length))

    texts = []
    for _ in range(n):
        short = rng.random() < 0.3
        length = int(rng.integers(5, 21)) if short else int(np.clip(rng.lognormal(4.7, 0.5), 40, 300))
        texts.append(text(length))
    if info.kind == JobKind.rerank:
        return [(text(int(rng.integers(3, 12))), passage) for passage in texts]
    return texts


# ---------------------------------------------------------------------------------- measuring
class _Run:
    """One loaded candidate with its sample batches, timed pass by pass, and its quality sample.

    Its time is the sum over batches of each batch's fastest pass, not the fastest whole pass: on
    a shared machine a burst of outside load lands in some batches of every pass, and a whole-pass
    minimum keeps that burst (a choice cached under load was 13% wrong that way, stop 25),
    while each batch's minimum drops it as soon as one pass ran that batch undisturbed. An
    asynchronous backend (OpenVINO's streams) keeps as many batches in flight as the engine does
    (``EMBEDFLEET_BATCHES_IN_FLIGHT``), and each such group of batches is timed as one.
    """

    def __init__(self, backend: Backend, info: "ModelInfo", inputs: list[Any], quality: list[Any] | None = None) -> None:
        self.backend = backend
        self.info = info
        self.rows, self.batches, self.tokens = sorted_batches(info, inputs, backend.preferred_batch_tokens)
        self.n = len(inputs)
        self.quality_inputs = quality or []
        depth = settings().batches_in_flight if backend.asynchronous else 1  # as the engine keeps them
        self.groups = [self.batches[i:i + depth] for i in range(0, len(self.batches), depth)]
        self.group_best = [float("inf")] * len(self.groups)
        self.values: np.ndarray | None = None
        self.quality: np.ndarray | None = None

    def warm_up(self) -> None:
        self.backend.forward(self.batches[-1])  # the longest shape, then the shortest
        self.backend.forward(self.batches[0])

    def timed_pass(self) -> None:
        outputs: list[np.ndarray] = []
        for index, group in enumerate(self.groups):
            start = time.perf_counter()
            waits = [self.backend.launch(batch) for batch in group]
            outputs += [wait() for wait in waits]
            self.group_best[index] = min(self.group_best[index], time.perf_counter() - start)
        if self.values is None:
            self.values = _in_order(self.rows, outputs, self.n)

    def quality_pass(self) -> None:
        """Outputs on the quality sample (untimed); nothing to do when there is none."""
        if self.quality_inputs:
            rows, batches, _ = sorted_batches(self.info, self.quality_inputs, self.backend.preferred_batch_tokens)
            self.quality = _in_order(rows, [self.backend.forward(b) for b in batches], len(self.quality_inputs))

    @property
    def best(self) -> float:
        """Seconds for the sample: each batch (or group in flight) at its fastest pass."""
        return sum(self.group_best)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.best


def _in_order(rows: list[np.ndarray], outputs: list[np.ndarray], n: int) -> np.ndarray:
    """Batch outputs put back in input order."""
    values = np.zeros((n, outputs[0].shape[1]), dtype=np.float32)
    for index, output in zip(rows, outputs):
        values[index] = output
    return values


def run_sample(backend: Backend, info: "ModelInfo", inputs: list[Any], passes: int = 2) -> tuple[np.ndarray, float]:
    """Outputs in input order and the best tokens/s of ``passes`` timed passes after a warm-up."""
    run = _Run(backend, info, inputs)
    run.warm_up()
    for _ in range(max(1, passes)):
        run.timed_pass()
    assert run.values is not None
    return run.values, run.tokens_per_s


def compare(info: "ModelInfo", reference: _Run, run: _Run, trial: Trial) -> None:
    """Fill ``trial``'s agreement with the fp32 reference and whether it is of equal quality.

    Embeddings: recall@10 against fp32 on the quality sample (``worker.backends.quality``) and
    the smallest cosine over both samples; scores: the largest difference from fp32's.
    """
    assert reference.values is not None and run.values is not None
    if info.kind == JobKind.embed:
        cosine = cosines(reference.values, run.values)
        if run.quality is not None and reference.quality is not None:
            measured = agreement(reference.quality, run.quality)
            trial.recall = measured.recall
            cosine = np.concatenate([cosine, cosines(reference.quality, run.quality)])
        trial.cos_min, trial.cos_mean = float(cosine.min()), float(cosine.mean())
        recall_ok = trial.recall >= RECALL_GATE if trial.recall == trial.recall else True
        trial.passed = bool(np.isfinite(cosine).all() and trial.cos_min >= COSINE_GATE and recall_ok)
        return
    if info.kind == JobKind.rerank:
        ref_scores, scores = rerank_scores(reference.values, False), rerank_scores(run.values, False)
    else:
        ref_scores = class_probabilities(reference.values, info.multi_label)
        scores = class_probabilities(run.values, info.multi_label)
    trial.max_score_diff = float(np.abs(ref_scores - scores).max())
    trial.passed = bool(np.isfinite(scores).all() and trial.max_score_diff <= SCORE_TOLERANCE)


def _cell(value: float, spec: str, width: int) -> str:
    """A number, or '-' where the column does not apply (cosines for scores, score gaps for vectors)."""
    return format(value, spec) if value == value else "-".rjust(width)  # NaN != NaN


def format_table(trials: list[Trial], chosen: Candidate | None = None) -> str:
    """The selection table, one line per candidate, for the log."""
    lines = [f"{'candidate':18} {'tokens/s':>9} {'recall@10':>9} {'cos min':>8} {'cos mean':>9} {'max|dp|':>8}  verdict"]
    for t in trials:
        verdict = "error: " + t.error if t.error else ("equal quality" if t.passed else "below the quality gate")
        if chosen is not None and t.candidate == chosen:
            verdict += "  <- chosen"
        lines.append(f"{str(t.candidate):18} {t.tokens_per_s:9.0f} {_cell(t.recall, '9.4f', 9)} "
                     f"{_cell(t.cos_min, '8.5f', 8)} {_cell(t.cos_mean, '9.5f', 9)} "
                     f"{_cell(t.max_score_diff, '8.4f', 8)}  {verdict}")
    return "\n".join(lines)


@dataclass
class Selection:
    """A loaded backend and, when it was measured against others, what each candidate did."""

    backend: Backend
    trials: list[Trial] = field(default_factory=list)
    chosen: Candidate | None = None
    #: One line: what was chosen and why (empty when the backend was named, not measured).
    reason: str = ""
    #: Whether the choice came from the cache rather than a measurement made now.
    cached: bool = False

    @property
    def table(self) -> str:
        """The selection table (empty when the backend was named, not measured)."""
        return format_table(self.trials, self.chosen) if self.trials else ""


# ---------------------------------------------------------------------------------- the cache
#: Libraries whose versions change what a candidate measures (a new one means measuring again).
MEASURED_LIBRARIES = ("torch", "onnxruntime", "onnx", "openvino", "transformers", "tokenizers", "embedfleet")
#: CPU features that decide which dtypes are fast (AMX, AVX-512 BF16/FP16/VNNI, AVX2).
CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f", "avx2",
             "avx_vnni")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in MEASURED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def machine() -> dict[str, object]:
    """What makes one machine's timings another's: CPU model (its name, and its family and model
    numbers: a VM may name a Zen 4 and a Zen 5 alike "AMD EPYC", with the same flags, while
    Zen 5's 512-bit datapaths change which candidate wins), its matrix units, usable cores."""
    model, flags, numbers = "", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("cpu family", "model") and key not in numbers:
                numbers[key] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        import platform

        model = platform.processor() or platform.machine()
    return {"cpu": model, "family": numbers.get("cpu family", ""), "model": numbers.get("model", ""),
            "flags": sorted(f for f in CPU_FLAGS if f in flags), "cores": cpu_threads(),
            "arch": os.uname().machine if hasattr(os, "uname") else ""}


def cache_path() -> Path:
    return cache_dir("backend-choices.json")


def knobs() -> dict[str, object]:
    """The settings that change how fast a candidate runs (a change means measuring again)."""
    from worker.backends.onnx import SCHEMES  # pure: onnxruntime itself is imported on use only
    from worker.backends.openvino import stream_count  # pure: OpenVINO itself is imported on use only
    from worker.backends import openvino_graph, openvino_int8

    return {"openvino_streams": stream_count(), "torch_compile": settings().torch_compile,
            "onnx_int8": SCHEMES["token"], "openvino_int8": f"{openvino_int8.weight_scheme()}-g{openvino_int8.ACTIVATION_GROUP}",
            "openvino_graph": f"{openvino_graph.FUSED}-{openvino_graph.SCHEME}",
            "timing": f"batch-min-runoff{RUNOFF_MARGIN}", "in_flight": settings().batches_in_flight}


def selection_key(info: "ModelInfo", device: str, options: list[Candidate], n_texts: int, passes: int) -> str:
    """The cache key of one selection: model revision, kind, device, candidates, machine, versions,
    and the speed knobs (``knobs``)."""
    parts = {"knobs": knobs(), "model": info.revision or info.name, "kind": info.kind.value, "device": device,
             "candidates": [str(c) for c in options], "sample": [n_texts, passes], "machine": machine(),
             "rule": [RECALL_GATE, COSINE_GATE, SCORE_TOLERANCE, QUALITY_TEXTS],
             "versions": library_versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def load_choice(key: str) -> dict | None:
    """The cached choice for ``key`` (a damaged or unreadable cache is ignored, not fatal)."""
    try:
        entry = json.loads(cache_path().read_text())[key]
        return entry if isinstance(entry, dict) and "backend" in entry and "dtype" in entry else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_choice(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        log.warning("could not cache the backend choice in %s: %s", path, exc)


def _trial_from(data: dict) -> Trial:
    candidate = Candidate(**data.pop("candidate"))
    return Trial(candidate, **{k: (float("nan") if v is None else v) for k, v in data.items()})


def _trial_json(trial: Trial) -> dict:
    data = asdict(trial)
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in data.items()}


def why(chosen: Trial, trials: list[Trial]) -> str:
    """One line: the pick, its speed and agreement with fp32, and what it beat."""
    passing = [t for t in trials if t.passed and t is not chosen]
    runner = max(passing, key=lambda t: t.tokens_per_s) if passing else None
    if chosen.cos_min == chosen.cos_min:
        recall = f"recall@10 vs fp32 {chosen.recall:.4f}, " if chosen.recall == chosen.recall else ""
        agreement = f"{recall}cosine to fp32 >= {chosen.cos_min:.5f}"
    else:
        agreement = f"scores within {chosen.max_score_diff:.4f} of fp32"
    beat = (f", {chosen.tokens_per_s / runner.tokens_per_s:.2f}x the next passing candidate ({runner.candidate})"
            if runner and runner.tokens_per_s > 0 else "")
    below = [str(t.candidate) for t in trials if not t.passed and not t.error and t is not chosen]
    rejected = f"; under the quality gate: {', '.join(below)}" if below else ""
    if not chosen.passed:
        return (f"{chosen.candidate}: the fastest of {len(trials)} candidates of the dtype asked for, UNDER the "
                f"quality gate ({chosen.tokens_per_s:,.0f} tokens/s, {agreement}); run because --dtype "
                f"{chosen.candidate.dtype} was asked{rejected}")
    return (f"{chosen.candidate}: the fastest of {len(trials)} candidates passing the quality gate "
            f"({chosen.tokens_per_s:,.0f} tokens/s, {agreement}{beat}){rejected}")


Loader = Callable[[str, "ModelInfo", str, str], Backend]


def _default_loader(name: str, info: "ModelInfo", device: str, dtype: str) -> Backend:
    return build(Recipe(name, info, device, dtype))


def load_backend(name: str, info: "ModelInfo", device: str, dtype: str, **options: Any) -> Selection:
    """Load ``info`` on ``device`` with the named backend (``options`` go to its constructor).

    ``auto`` on CPU measures the candidate backends/dtypes on a short sample and keeps the
    fastest of equal quality to fp32; ``dtype`` narrows the candidates (and the fastest of
    them runs, even under the gate). On GPUs ``auto`` is
    the torch backend (bf16 where supported).
    """
    if name == "auto":
        resolved = resolve_device(device)
        if resolved == "cpu":
            return select_backend(info, device=resolved, dtype=dtype)
        name, device = "torch", resolved
    if name != "torch":
        options = {}
    return Selection(build(Recipe(name, info, device, dtype, tuple(sorted(options.items())))))


def select_backend(info: "ModelInfo", device: str = "auto", dtype: str = "auto", n_texts: int = SAMPLE_TEXTS,
                   passes: int = 2, loader: Loader | None = None, cache: bool | None = None) -> Selection:
    """The cached choice for this model, machine and library versions, loaded; else measure the
    candidates, keep the fastest one that passes the gate, cache the choice and return it loaded.

    All candidates are loaded together and their timed passes interleaved (round-robin), so a
    burst of load from another process on a shared machine hits them all alike instead of
    deciding the race. torch fp32 is always run: it is the quality reference. ``cache``
    defaults to on with the real loader (a test's stand-in loader measures every time).
    """
    load = loader or _default_loader
    use_cache = loader is None if cache is None else cache
    device = resolve_device(device)
    options = candidates(device, dtype)
    key = selection_key(info, device, options, n_texts, passes)
    if use_cache:
        cached = _cached_selection(key, info, device, load)
        if cached is not None:
            return cached
    selection = _measure(info, device, options, n_texts, passes, load, asked=canonical_dtype(dtype) != "auto")
    if use_cache and selection.chosen is not None:
        store_choice(key, {"backend": selection.chosen.backend, "dtype": selection.chosen.dtype,
                           "reason": selection.reason, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "trials": [_trial_json(t) for t in selection.trials]})
    return selection


def _cached_selection(key: str, info: "ModelInfo", device: str, load: Loader) -> Selection | None:
    entry = load_choice(key)
    if entry is None:
        return None
    chosen = Candidate(entry["backend"], entry["dtype"])
    try:
        backend = load(chosen.backend, info, device, chosen.dtype)
    except Exception as exc:  # e.g. an export cache removed and not rebuildable: measure again
        log.warning("the cached backend choice %s for %s does not load (%s); measuring again", chosen, info.name, exc)
        return None
    trials = [_trial_from(dict(t)) for t in entry.get("trials", [])]
    measured = str(entry.get("reason") or chosen).split("; measured now")[0]
    reason = f"{measured}; cached, measured {entry.get('measured_at', '')} (in {cache_path()})"
    log.info("backend auto selection for %s on %s: %s", info.name, device, reason)
    return Selection(backend, trials, chosen, reason=reason, cached=True)


def _measure(info: "ModelInfo", device: str, options: list[Candidate], n_texts: int, passes: int,
             load: Loader, asked: bool = False) -> Selection:
    """Time every candidate (interleaved), compare each with fp32, keep the fastest of equal
    quality; with a dtype ``asked`` for, the fastest of that dtype even under the gate."""
    inputs = sample_inputs(info, n_texts)
    quality = prose(max(QUALITY_TEXTS, n_texts)) if info.kind == JobKind.embed else []
    fp32 = Candidate("torch", "float32")
    order = [fp32] + [c for c in options if c != fp32]
    trials = {c: Trial(c) for c in order}
    runs: dict[Candidate, _Run] = {}
    try:
        for candidate in order:
            try:
                backend = load(candidate.backend, info, device, candidate.dtype)
            except Exception as exc:  # a candidate that cannot load here is reported, not fatal
                if candidate == fp32:
                    raise
                trials[candidate].error = f"{type(exc).__name__}: {exc}"
                continue
            runs[candidate] = _Run(backend, info, inputs, quality)
            _guarded(trials[candidate], runs, candidate, _Run.warm_up)
        for _ in range(max(1, passes)):
            for candidate in list(runs):
                _guarded(trials[candidate], runs, candidate, _Run.timed_pass)
        for candidate in list(runs):
            _guarded(trials[candidate], runs, candidate, _Run.quality_pass)
        if fp32 in runs and runs[fp32].values is not None:
            _runoff(info, runs, trials, fp32, passes, asked)
        if fp32 not in runs or runs[fp32].values is None:
            raise BackendUnavailable(f"the torch float32 reference failed on {device}: {trials[fp32].error}")
        for candidate, run in runs.items():
            trials[candidate].tokens_per_s = run.tokens_per_s
            compare(info, runs[fp32], run, trials[candidate])
        shown = [trials[c] for c in order if c in options]
        passing = [t for t in shown if (t.passed or asked) and t.candidate in runs]
        chosen = max(passing, key=lambda t: t.tokens_per_s).candidate if passing else None
        table = format_table(shown, chosen)
        log.info("backend auto selection for %s on %s (%d texts):\n%s", info.name, device, len(inputs), table)
        if chosen is None:
            raise BackendUnavailable(f"no backend passed the quality gate for {info.name} on {device}:\n{table}")
        backend = runs.pop(chosen).backend
    finally:
        for run in runs.values():
            run.backend.close()
    reason = why(trials[chosen], shown) + f"; measured now on {len(inputs)} texts"
    log.info("backend auto selection for %s on %s: %s", info.name, device, reason)
    return Selection(backend, shown, chosen, reason=reason)


#: Candidates whose speeds are closer than this ratio get a runoff (more passes, the two alone).
RUNOFF_MARGIN = 1.15


def _runoff(info: "ModelInfo", runs: dict[Candidate, _Run], trials: dict[Candidate, Trial], fp32: Candidate,
            passes: int, asked: bool) -> None:
    """More interleaved passes for the two fastest eligible candidates when they are within
    ``RUNOFF_MARGIN``: a close call is where a burst of outside load decides the race, and the
    cached choice then stays wrong for every later start on this machine."""
    eligible = []
    for candidate, run in runs.items():
        probe = Trial(candidate)
        compare(info, runs[fp32], run, probe)
        if probe.passed or asked:
            eligible.append(candidate)
    if len(eligible) < 2:
        return
    first, second = sorted(eligible, key=lambda c: runs[c].tokens_per_s, reverse=True)[:2]
    if runs[first].tokens_per_s > RUNOFF_MARGIN * runs[second].tokens_per_s:
        return
    log.info("backend auto selection: %s and %s are within %.0f%%; %d more passes for the two",
             first, second, (RUNOFF_MARGIN - 1) * 100, 2 * max(1, passes))
    for _ in range(2 * max(1, passes)):
        for candidate in (first, second):
            if candidate in runs:
                _guarded(trials[candidate], runs, candidate, _Run.timed_pass)


def _guarded(trial: Trial, runs: dict[Candidate, _Run], candidate: Candidate, step: Callable[[_Run], None]) -> None:
    """Run one measuring step; a candidate that fails is reported and dropped, not fatal."""
    try:
        step(runs[candidate])
    except Exception as exc:
        trial.error = f"{type(exc).__name__}: {exc}"
        runs.pop(candidate).backend.close()
