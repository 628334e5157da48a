"""Prometheus metrics of the HTTP facade.

Each facade app has its own registry (tests start several apps in one process, and a global
registry would refuse the second). What the facade sees itself (requests, latency, tokens,
inputs per request) is counted as it happens; what only the workers know (queue depth, the
engine's batch sizes) is read at scrape time from the facade's latest discovery answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class WorkerSample:
    """What the facade last heard about one served model (summed over the workers hosting it)."""

    model: str
    kind: str
    queue: str
    workers: int
    queue_depth: int | None
    inline_queue: str
    inline_queue_depth: int | None
    batches: int
    items: int
    tokens: int
    padded_tokens: int
    #: per engine process: (worker, device, batches, tokens)
    devices: tuple[tuple[str, str, int, int], ...] = ()


class _WorkerCollector:
    """Exports the latest worker samples at scrape time (no stale series once a model is gone)."""

    def __init__(self, sample: Callable[[], list[WorkerSample]]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        samples = self._sample()
        workers = GaugeMetricFamily("embedfleet_workers", "Workers answering for a model", labels=["model", "kind"])
        depth = GaugeMetricFamily("embedfleet_queue_depth", "Messages waiting in a model's queue", labels=["queue"])
        batches = CounterMetricFamily("embedfleet_worker_batches", "Engine batches run (all workers)", labels=["model"])
        items = CounterMetricFamily("embedfleet_worker_batch_items", "Inputs in engine batches", labels=["model"])
        tokens = CounterMetricFamily("embedfleet_worker_batch_tokens", "Real tokens in engine batches", labels=["model"])
        padded = CounterMetricFamily("embedfleet_worker_batch_padded_tokens", "Padded tokens in engine batches",
                                     labels=["model"])
        mean = GaugeMetricFamily("embedfleet_worker_mean_batch_size", "Mean inputs per engine batch", labels=["model"])
        device_batches = CounterMetricFamily("embedfleet_device_batches", "Engine batches run, per engine process "
                                             "and its device", labels=["model", "worker", "device"])
        device_tokens = CounterMetricFamily("embedfleet_device_batch_tokens", "Real tokens in engine batches, per "
                                            "engine process and its device", labels=["model", "worker", "device"])
        for s in samples:
            workers.add_metric([s.model, s.kind], s.workers)
            for queue, count in ((s.queue, s.queue_depth), (s.inline_queue, s.inline_queue_depth)):
                if count is not None:
                    depth.add_metric([queue], count)
            batches.add_metric([s.model], s.batches)
            items.add_metric([s.model], s.items)
            tokens.add_metric([s.model], s.tokens)
            padded.add_metric([s.model], s.padded_tokens)
            mean.add_metric([s.model], s.items / s.batches if s.batches else 0.0)
            for worker, device, n_batches, n_tokens in s.devices:
                device_batches.add_metric([s.model, worker, device], n_batches)
                device_tokens.add_metric([s.model, worker, device], n_tokens)
        return [workers, depth, batches, items, tokens, padded, mean, device_batches, device_tokens]


class FacadeMetrics:
    """The facade's own counters plus the workers' figures, in one registry."""

    def __init__(self, sample: Callable[[], list[WorkerSample]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embedfleet_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("embedfleet_http_request_duration_seconds", "Request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("embedfleet_tokens", "Real (non-padding) tokens processed", ["model", "kind"],
                              registry=self.registry)
        self.inputs = Histogram("embedfleet_request_inputs", "Inputs per request", ["kind"],
                                buckets=SIZE_BUCKETS, registry=self.registry)
        self.inflight = Gauge("embedfleet_inflight_requests", "Requests waiting for a worker",
                              registry=self.registry)
        self.requests_per_job = Histogram("embedfleet_requests_per_job",
                                          "Requests carried by each job sent (concurrent ones are merged)",
                                          buckets=SIZE_BUCKETS, registry=self.registry)
        self.rejected = Counter("embedfleet_rejected_requests", "Requests refused before reaching a worker",
                                ["reason"], registry=self.registry)
        self.registry.register(_WorkerCollector(sample))  # type: ignore[arg-type]
        #: labelled children by (metric, label values): ``labels()`` costs ~10 us a call, and
        #: every request makes four (label values are bounded: known routes, served models)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def count(self, model: str, kind: str, tokens: int, inputs: int) -> None:
        """Tokens and inputs one request ran."""
        self._child(self.tokens, model, kind).inc(tokens)
        self._child(self.inputs, kind).observe(inputs)

    def render(self) -> bytes:
        return generate_latest(self.registry)
