"""The Celery app a producer sends with, and the settings both sides must agree on.

JSON only, in both directions: a broker is not a trusted channel, so pickle is never accepted.
Workers build their app on top of this one (``worker.hosting.app``) and add what only consumers need.

Brokers: ``redis://`` (a visibility timeout longer than any shard; unacked work comes back when
a worker dies) and ``sqs://`` (kombu's SQS transport with predefined queues, long polling, and a
dead-letter queue with a redrive policy next to every work queue). The tunables (visibility
timeout, deliveries before parking, SQS region, long polling, queue creation) are settings
(``producer.settings``), so a fleet is configured the same way on every machine.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend

from producer.errors import BadInput, SettingsError
from producer.jobs import INLINE_SUFFIX
from producer.settings import aws_endpoint, settings, sqs_region

INLINE_TASK = "embedfleet.inline"
SHARD_TASK = "embedfleet.shard"
INFO_TASK = "embedfleet.info"
#: The broadcast command every worker answers with what it hosts (the facade discovers models).
MODELS_COMMAND = "embedfleet_models"

MEMORY_BROKER = "memory://localhost/"
MEMORY_BACKEND = "cache+memory://"

DLQ_SUFFIX = "-dlq"
#: SQS keeps an unconsumed inline call this long (its caller has long given up by then).
INLINE_RETENTION_S = 900


def visibility_timeout() -> int:
    return settings().visibility_timeout


def max_deliveries() -> int:
    return settings().max_deliveries


def job_ttl() -> int:
    """Seconds a job's Redis keys live (``EMBEDFLEET_JOB_TTL``)."""
    return settings().job_ttl


def broker_kind(broker: str) -> str:
    """``redis``, ``sqs`` or ``memory`` (other kombu transports are refused: untested here)."""
    scheme = broker.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme == "sqs":
        return "sqs"
    if scheme == "memory":
        return "memory"
    raise BadInput(f"broker scheme {scheme}:// is not supported; use redis://, rediss:// or sqs://", param="broker")


def default_backend(broker: str) -> str:
    """Where inline results travel: the same Redis as the broker; in-process for memory://."""
    backend = settings().result_backend
    if broker.startswith(("redis://", "rediss://")):
        return backend or broker
    if broker.startswith("memory://"):
        return MEMORY_BACKEND
    if backend:
        return backend
    raise BadInput(
        f"broker {broker.split('://')[0]}:// has no result backend of its own; "
        "set --result-backend / EMBEDFLEET_RESULT_BACKEND (e.g. a redis:// URL)", param="result_backend"
    )


def base_settings() -> dict[str, Any]:
    """Settings that producers and workers share."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_default_queue": "embedfleet.default",
        "result_expires": 3600,
        "task_track_started": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
    }


def redis_transport_options() -> dict[str, Any]:
    """Unacked messages come back after the visibility timeout; sweep for them often enough."""
    timeout = visibility_timeout()
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": max(1, min(10, timeout // 4)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
    }


# ---------------------------------------------------------------------------- SQS
def sqs_name(queue: str) -> str:
    """The SQS name of a Celery queue, as kombu spells it ('.' is not allowed in SQS names)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in queue)[:80]


_sqs_lock = threading.Lock()


def _sqs_client() -> Any:
    import boto3

    return boto3.client("sqs", region_name=sqs_region())  # honours AWS_ENDPOINT_URL(_SQS)


def ensure_sqs_queue(queue: str, client: Any = None) -> str:
    """The URL of a work queue, created with a dead-letter queue and a redrive policy if missing
    (an inline-call queue is created without one: see below).

    ``maxReceiveCount`` is one more than ``EMBEDFLEET_MAX_DELIVERIES``: the worker itself parks
    a shard on that last receive (and the job reports it); SQS moves a message to the DLQ only
    if even that delivery never finishes, so nothing is silently dropped.
    """
    client = client or _sqs_client()
    name = sqs_name(queue)
    try:
        return str(client.get_queue_url(QueueName=name)["QueueUrl"])
    except client.exceptions.QueueDoesNotExist:
        if not settings().sqs_create_queues:
            raise SettingsError(
                f"SQS queue {name!r} does not exist (EMBEDFLEET_SQS_CREATE_QUEUES=0); create it with its "
                f"dead-letter queue {name + DLQ_SUFFIX!r} (infra/) or allow creation"
            ) from None
    if queue.endswith(INLINE_SUFFIX):
        # Inline calls are consumed without acknowledgement (deleted on receipt) and carry a
        # deadline: a dead-letter queue would never receive one, and an old one is worthless.
        attributes = {"MessageRetentionPeriod": str(INLINE_RETENTION_S)}
        return str(client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])
    dlq_url = client.create_queue(QueueName=name + DLQ_SUFFIX,
                                  Attributes={"MessageRetentionPeriod": str(14 * 86400)})["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_deliveries() + 1)}
    attributes = {"VisibilityTimeout": str(visibility_timeout()), "RedrivePolicy": json.dumps(policy)}
    return str(client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def sqs_transport_options(queues: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Region, long polling, visibility timeout and the predefined queues (URLs resolved once)."""
    wait = settings().sqs_wait  # at most 20 s, SQS's maximum long-polling time
    options: dict[str, Any] = {
        "region": sqs_region(),
        "wait_time_seconds": wait,
        "polling_interval": 0 if wait else 1,
        "visibility_timeout": visibility_timeout(),
        "predefined_queues": {},
    }
    endpoint = aws_endpoint("sqs")
    if endpoint:
        options["is_secure"] = endpoint.startswith("https")
    for queue in queues:
        _predefine(options["predefined_queues"], queue)
    return options


def _predefine(predefined: dict[str, Any], queue: str) -> None:
    name = sqs_name(queue)
    if name in predefined:
        return
    entry = {"url": ensure_sqs_queue(queue)}
    # kombu looks queues up both by the Celery name and by the SQS name.
    predefined[name] = entry
    predefined[queue] = entry


def declare_queue(app: Celery, queue: str) -> None:
    """Make ``queue`` usable on this app: on SQS, resolve (or create) it and predefine it.

    kombu reads ``predefined_queues`` by reference, so adding to the same dict works on a
    connection that is already open.
    """
    if broker_kind(str(app.conf.broker_url)) != "sqs":
        return
    with _sqs_lock:
        _predefine(app.conf.broker_transport_options["predefined_queues"], queue)


# ---------------------------------------------------------------------------- Redis job records
JOBS_KEY = "embedfleet:jobs"
JOB_SHARDS_KEY = "embedfleet:job:{}:shards"
#: shards over without a marker in storage (``record_unwritten``): index -> why
JOB_UNWRITTEN_KEY = "embedfleet:job:{}:unwritten"


def record_job(app: Celery, job_id: str, shards: dict[int, dict[str, Any]]) -> None:
    """On Redis, remember a job's shard messages so workers can re-send one Redis lost.

    (kombu pops a message before recording it as unacknowledged; a worker killed in between
    loses it. ``worker.hosting.sweeper`` finds such shards and sends them again.) Other brokers keep
    a received message until it is acknowledged, so nothing is recorded for them.
    """
    url = str(app.conf.broker_url)
    if broker_kind(url) != "redis":
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    key = JOB_SHARDS_KEY.format(job_id)
    pipe = client.pipeline()
    pipe.delete(key)
    if shards:
        pipe.hset(key, mapping={str(i): json.dumps(s) for i, s in shards.items()})
        pipe.expire(key, job_ttl())  # gone by then even if no sweeper ever sees the job finish
        pipe.sadd(JOBS_KEY, job_id)  # the sweeper drops an id whose shard list is gone
        # a shard sent again (``resume``) is no longer over: its old record beside the queue would
        # keep the sweeper from re-sending it and make the job report it failed
        pipe.hdel(JOB_UNWRITTEN_KEY.format(job_id), *map(str, shards))
    pipe.execute()


def recorded_shard(broker_url: str, job_id: str, index: int) -> dict[str, Any] | None:
    """The message ``record_job`` recorded for shard ``index`` of ``job_id`` (the payload as sent,
    signature included), or ``None``: not recorded, or a broker that records nothing (SQS, memory).

    A worker that refuses a shard message compares it with this: only the job's own message may
    end the shard failed; a forged or altered one must not (``worker.hosting.tasks.refuse``)."""
    if broker_kind(broker_url) != "redis":
        return None
    import redis

    raw = redis.Redis.from_url(broker_url, socket_connect_timeout=5).hget(JOB_SHARDS_KEY.format(job_id), str(index))
    if raw is None:
        return None
    payload = json.loads(raw).get("payload")
    return payload if isinstance(payload, dict) else None


#: The in-memory transport's record (``embedfleet run``): it lives as long as the process, as the queue does.
_unwritten_here: dict[str, dict[int, str]] = {}


def record_unwritten(broker_url: str, job_id: str, index: int, reason: str) -> None:
    """Remember, beside the queue, a shard that failed and whose failure marker could not be
    written either (the output is unwritable or full, or a worker refused the job's own message
    and may not write where it points): ``JobHandle`` reads it, so the job ends failed with the
    reason instead of waiting for a marker that can never appear."""
    kind = broker_kind(broker_url)
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(broker_url, socket_connect_timeout=5)
        key = JOB_UNWRITTEN_KEY.format(job_id)
        client.pipeline().hset(key, str(index), reason[:2000]).expire(key, job_ttl()).execute()
    elif kind != "sqs":  # SQS moves such a message to its dead-letter queue (the redrive policy)
        _unwritten_here.setdefault(job_id, {})[index] = reason


def unwritten_shards(broker_url: str | None, job_id: str, queue: str | None = None) -> dict[int, str]:
    """Shard index -> the storage error, for the shards ``record_unwritten`` recorded; on SQS, the
    shards of the job that its queue's redrive policy moved to the dead-letter queue."""
    kind = broker_kind(broker_url or MEMORY_BROKER)
    if kind == "redis":
        import redis

        raw = redis.Redis.from_url(str(broker_url), socket_connect_timeout=5).hgetall(JOB_UNWRITTEN_KEY.format(job_id))
        return {int(k): v.decode("utf-8", "replace") for k, v in raw.items()}
    if kind == "sqs":
        return dead_lettered(queue, job_id) if queue else {}
    return dict(_unwritten_here.get(job_id, {}))


#: A peek at a dead-letter queue reads at most this many batches of 10 (SQS bills every call).
DLQ_PEEK_CALLS = 5
#: ... and is repeated at most this often for one job (``JobHandle.wait`` polls twice a second).
DLQ_PEEK_EVERY_S = 10.0
_peeked: dict[tuple[str, str], tuple[float, dict[int, str]]] = {}


def dead_lettered(queue: str, job_id: str, client: Any = None) -> dict[int, str]:
    """Shards of ``job_id`` in the dead-letter queue of ``queue``: index -> why they are there.

    SQS moves a shard there only when no delivery could finish it and not even the worker's
    parking could be written (``worker.hosting.tasks.park``). A peek: up to
    ``DLQ_PEEK_CALLS`` receives of 10 with a visibility timeout of 0, so the messages stay where
    they are for whoever inspects or redrives them (a large DLQ may hide some from one peek).
    """
    key = (queue, job_id)
    now = time.monotonic()
    cached = _peeked.get(key)
    if cached is not None and now - cached[0] < DLQ_PEEK_EVERY_S:
        return dict(cached[1])
    client = client or _sqs_client()
    name = sqs_name(queue) + DLQ_SUFFIX
    try:
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    except client.exceptions.QueueDoesNotExist:
        return {}
    found: dict[int, str] = {}
    for _ in range(DLQ_PEEK_CALLS):
        messages = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                          WaitTimeSeconds=0).get("Messages", [])
        for message in messages:
            shard = _shard_in(message.get("Body", ""))
            if shard is not None and shard[0] == job_id:
                found[shard[1]] = (f"its message is in the dead-letter queue {name}: no delivery finished it and "
                                   f"its failure could not be recorded in the output either (see the workers' logs)")
        if len(messages) < 10:
            break
    _peeked[key] = (now, found)
    return dict(found)


def _shard_in(body: str) -> tuple[str, int] | None:
    """(job id, shard index) of a shard message as kombu's SQS transport sends it, else ``None``."""
    try:
        envelope = json.loads(base64.b64decode(body))
        inner = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            inner = base64.b64decode(inner)
        payload = json.loads(inner)[0][0]
        return str(payload["job_id"]), int(payload["shard"]["index"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


#: kombu's Redis hash of delivered, unacknowledged messages (its default ``unacked_key``)
UNACKED_KEY = "unacked"


def job_forgotten(broker_url: str | None, job_id: str, queue: str) -> bool:
    """Whether a Redis broker holds nothing of a job: no shard record, nothing queued, nothing in flight.

    ``record_job`` keeps the record until the job's manifest is written, so for a job without a
    manifest this is what a Redis restarted without persistence leaves: its shards will never come.
    A message in flight names the job in its headers (task id and argsrepr). Other brokers keep
    their messages and record nothing: never forgotten.
    """
    if broker_kind(broker_url or MEMORY_BROKER) != "redis":
        return False
    import redis

    client = redis.Redis.from_url(str(broker_url), socket_connect_timeout=5)
    if client.exists(JOB_SHARDS_KEY.format(job_id)) or client.llen(queue):
        return False
    needle = job_id.encode()
    return not any(needle in raw for raw in client.hvals(UNACKED_KEY))


def job_record_key(job_id: str) -> str:
    """The result-backend key mapping a job id to its output folder (``status <job-id>``)."""
    return f"embedfleet-job-{job_id}"


def remember_job(app: Celery, job_id: str, out: str) -> None:
    """Record where a job writes, for ``status <job-id>``, for ``EMBEDFLEET_JOB_TTL`` seconds.

    Set on the result backend's own Redis client with the job's TTL (the backend's ``set`` would
    apply ``result_expires``, an hour, after which ``status <id>`` no longer found the job)."""
    backend = app.backend
    if isinstance(backend, RedisBackend):
        backend.client.set(job_record_key(job_id), out, ex=job_ttl())
    else:  # an in-process backend: lives as long as the process
        backend.set(job_record_key(job_id), out)


def find_job_out(app: Celery, job_id: str) -> str | None:
    """The output folder recorded for ``job_id``, or ``None``."""
    backend = app.backend
    client = backend.client if isinstance(backend, RedisBackend) else backend
    value = client.get(job_record_key(job_id))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def make_app(
    broker: str = MEMORY_BROKER,
    backend: str | None = None,
    name: str = "embedfleet",
    queues: list[str] | tuple[str, ...] = (),
) -> Celery:
    """A Celery app for ``broker`` with JSON-only settings and the broker's transport options."""
    kind = broker_kind(broker)
    app = Celery(name, broker=broker, backend=backend or default_backend(broker), set_as_current=False)
    app.conf.update(base_settings())
    if kind == "redis":
        app.conf.broker_transport_options = redis_transport_options()
        app.conf.result_backend_transport_options = {"socket_connect_timeout": 5, "retry_on_timeout": True}
    elif kind == "sqs":
        app.conf.broker_transport_options = sqs_transport_options(queues)
        # SQS has no fanout for remote control or events: only the task queues are used.
        app.conf.worker_enable_remote_control = False
        app.conf.worker_send_task_events = False
    return app
