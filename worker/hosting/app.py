"""The worker's Celery app: the producer's JSON-only app plus what only consumers need.

Late acks and reject-on-worker-lost mean a message is acknowledged only after its output is
published, so a worker that dies mid-shard gives the shard back to the queue. A prefetch
multiplier of 1 reserves exactly as many messages as the worker runs at once (its shard slots:
``--concurrency`` plus the shards it reads ahead, ``WorkerSpec.shard_slots``): every in-flight
task feeds the one engine (their texts share batches), and nothing sits reserved behind them
where a dead worker would hold it until the visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.broker import broker_kind, default_backend, make_app
from worker.hosting.results import backend_url
from worker.hosting.transport import SQS_TRANSPORT, TRANSPORT


def worker_settings(prefetch: int) -> dict[str, Any]:
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": max(1, prefetch),
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def create_app(broker: str, backend: str | None = None, prefetch: int = 1) -> Celery:
    """A worker app whose tasks are embedfleet's (importing ``worker.hosting.tasks`` registers them).

    ``prefetch`` is the multiplier per concurrent task; 1 (the default) is right for shards.
    """
    import worker.hosting.info  # noqa: F401  (registers the shared tasks)
    import worker.hosting.tasks  # noqa: F401

    app = make_app(broker, backend_url(backend or default_backend(broker)), name="embedfleet-worker")
    app.conf.update(worker_settings(prefetch))
    if broker_kind(broker) == "redis":  # an undecodable entry is discarded, not a consumer crash
        app.conf.broker_transport = TRANSPORT
        if broker.startswith("rediss://") and not app.conf.broker_use_ssl:
            import ssl  # kombu infers TLS from the scheme only when it picks the transport itself

            app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    elif broker_kind(broker) == "sqs":
        app.conf.broker_transport = SQS_TRANSPORT
    return app
