"""The broker's ceiling: how many shard and inline messages per second Redis and SQS carry, so a
capacity plan can choose shard sizes that keep the broker far from being the limit.

Three figures per broker, each the best of ``--rounds`` passes with the spread:

* raw: shard-sized JSON messages published through Celery's ``send_task`` and drained with
  acknowledgements by a kombu consumer (no engine): what the broker and its client library
  carry on this machine;
* shards: a corpus job of one-row shards (``--shards`` of them) drained by a real
  ``embedfleet worker --devices cpu:2`` on the bundled model: every message is a real shard
  (read a Parquet row range, embed, publish a part and a done-marker), so this is the per-shard
  fixed cost of the whole path, the rate a fleet can never exceed however small its shards;
* inline: single-text ``Client.embed`` calls from ``--clients`` threads for ``--seconds``.

SQS runs on moto's server (``ThreadedMotoServer``) in this process: its figures bound what the
client side and kombu's SQS transport cost, not AWS's service limits (standard queues have no
published message-rate limit; each API call costs ~10-30 ms of network latency in a region,
which long polling of 10 messages per receive amortizes).

    python -m bench.broker_ceiling --rounds 2 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import EMBEDFLEET, TEXT, RedisProcess, free_port, machine, stop, wait_for_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

#: a message the size of a real shard reference (the JSON ``ShardJob`` is ~700 bytes)
SHARD_SIZED = {"kind": "embed", "job_id": "0" * 16, "model": "all-MiniLM-L6-v2", "out": "/tmp/" + "o" * 40,
               "columns": {"text": "text", "id": "id", "query": "query", "document": "document"},
               "options": {"normalize": None, "truncate": True, "dimensions": None, "output_dtype": "float32"},
               "shard": {"uri": "s3://bucket/" + "c" * 60 + ".parquet", "format": "parquet", "index": 0,
                         "row_start": 0, "row_end": 10000, "row_groups": [0, 1, 2, 3]}, "n_shards": 1000}


def best(passes: list[float]) -> str:
    return f"{max(passes):,.0f} (spread {min(passes):,.0f}-{max(passes):,.0f})"


def raw_rate(broker: str, n: int) -> tuple[float, float]:
    """Messages/s published by ``send_task``, then drained (get + ack) by a kombu consumer."""
    from producer.broker import declare_queue, make_app

    app = make_app(broker)
    queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
    declare_queue(app, queue)
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("embedfleet.bench.noop", args=[SHARD_SIZED], queue=queue, producer=producer,
                          task_id=f"raw-{i}")
    published = n / (time.perf_counter() - started)
    got = 0
    started = time.perf_counter()
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        while got < n:
            message = simple.get(block=True, timeout=30)
            message.ack()
            got += 1
        simple.close()
    drained = n / (time.perf_counter() - started)
    return published, drained


def start_worker(broker: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [EMBEDFLEET, "worker", "--broker", broker, "--device", "cpu", "--devices", "cpu:2",
               "--backend", "torch", "--dtype", "float32", "--concurrency", "4", "--storage-root", str(log.parent)]
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    wait_for_line(proc, log, "worker ready")
    return proc


def shard_rate(client: Any, corpus: Path, out: Path) -> float:
    """One-row shards per second, from submission to the manifest."""
    started = time.perf_counter()
    handle = client.submit_corpus(str(corpus), str(out), id_column="id", shard_rows=1)
    manifest = handle.wait(timeout=900)
    assert manifest.status == "complete", manifest
    return handle.n_shards / (time.perf_counter() - started)


def inline_rate(client: Any, clients: int, seconds: float) -> float:
    """Single-text calls per second from ``clients`` threads."""
    client.embed([TEXT], timeout=60)  # warm: the facade-free client's first call opens its connections
    counts = [0] * clients
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            client.embed([TEXT], timeout=60)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(name: str, broker: str, env: dict[str, str], workdir: Path, args: argparse.Namespace,
            client_factory: Callable[[], Any]) -> dict[str, str]:
    raw_pub, raw_drain, shards, inline = [], [], [], []
    for _ in range(args.rounds):
        p, d = raw_rate(broker, args.raw_sqs if broker.startswith("sqs") else args.raw)
        raw_pub.append(p)
        raw_drain.append(d)
    corpus = workdir / "one-row-shards.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(args.shards)],
                             "text": [f"{TEXT} {i}" for i in range(args.shards)]}), corpus)
    worker = start_worker(broker, workdir / f"worker-{name}.log", env)
    try:
        client = client_factory()
        for r in range(args.rounds):
            shards.append(shard_rate(client, corpus, workdir / f"out-{name}-{r}"))
            inline.append(inline_rate(client, args.clients, args.seconds))
    finally:
        stop(worker)
    row = {"broker": name, "raw publish msg/s": best(raw_pub), "raw drain msg/s": best(raw_drain),
           "one-row shards/s (real engine)": best(shards), f"inline calls/s ({args.clients} clients)": best(inline)}
    print(row, flush=True)
    return row


def moto_env() -> tuple[Any, dict[str, str]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per SQS call otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "EMBEDFLEET_SQS_WAIT": "1"}
    return server, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--raw", type=int, default=2000, help="messages per raw pass (Redis)")
    parser.add_argument("--raw-sqs", type=int, default=300, help="messages per raw pass (SQS on moto)")
    parser.add_argument("--shards", type=int, default=300, help="one-row shards per pass")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--brokers", default="redis,sqs")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    from producer.client import Client

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisProcess(workdir)
        try:
            if "redis" in args.brokers:
                rows.append(measure("Redis", redis.url, {}, workdir, args, lambda: Client(broker=redis.url)))
            if "sqs" in args.brokers:
                server, env = moto_env()
                os.environ.update(env)
                env["EMBEDFLEET_RESULT_BACKEND"] = redis.url
                os.environ["EMBEDFLEET_RESULT_BACKEND"] = redis.url
                try:
                    rows.append(measure("SQS (moto)", "sqs://", env, workdir, args,
                                        lambda: Client(broker="sqs://", result_backend=redis.url)))
                finally:
                    server.stop()
        finally:
            redis.stop()
    header = list(rows[0])
    table = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    table += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python -m bench.broker_ceiling " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
        with args.out.open("a") as handle:
            handle.write(f"\n{stamp}, {machine()}: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
