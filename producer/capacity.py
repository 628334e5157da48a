"""The capacity plan ``embedfleet plan`` prints: instances, hours and dollars per instance type for
a corpus, and the broker load that implies.

Why these numbers can be trusted as far as they go: every figure the plan starts from was measured
on this code and is recorded in bench/RESULTS.md; they live in one place, ``MEASURED`` below, each
naming its section and command (a test holds them to the file). The H200's rate for small models
is the bulk path measured end to end (Redis, a worker, Parquet); for large models it is the
engine's measured rate plus the per-token cost of that bulk path outside the engine (both measured
on the H200, the sum shown). Every other device's rate is the H200's scaled by its dense fp16/bf16
tensor peak relative to the H200, printed as an estimate with the arithmetic. The corpus's tokens
are estimated from a sample of its rows (1.3 WordPiece tokens per whitespace word, plus the two
special tokens), so the plan needs no model and no worker.

Prices are on-demand list prices (us-east-1) as recorded here; pass ``--price TYPE=USD`` for
yours. The broker load is set against the ceiling measured by ``bench/broker_ceiling.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from producer.errors import BadInput

#: WordPiece/BPE tokens per whitespace-separated English word (all-MiniLM / BERT vocabularies)
TOKENS_PER_WORD = 1.3
#: [CLS] and [SEP] (or <s> and </s>) around every text
SPECIAL_TOKENS = 2
#: a shard should keep one device busy at least this long, so per-shard costs stay negligible
MIN_SHARD_SECONDS = 10.0


@dataclass(frozen=True)
class Figure:
    """One measurement the plan uses, as bench/RESULTS.md records it."""

    value: float
    #: the bench/RESULTS.md section (its heading starts so) and the command that measured it
    section: str
    command: str
    #: the figure as the section prints it (a test finds this text in that section)
    recorded: str


#: Every measured figure the plan starts from, and where bench/RESULTS.md records it. Change a
#: figure only together with its RESULTS.md section (tests/producer/test_capacity.py checks both).
MEASURED = {
    # H200, bundled MiniLM bf16, 100,000 mixed texts through Redis + one worker + Parquet
    "h200_small_bulk": Figure(
        386_911, "## The columnar host path (issue #13)",
        "python -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4",
        "fleet 386,911"),
    # the same run's bare engine (Engine.run on the same corpus): the bulk path's cost outside it
    "h200_small_engine": Figure(
        2_305_931, "## The columnar host path (issue #13)",
        "python -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4",
        "bare engine 2,305,931"),
    # H200, BERT-large architecture (bge-large), embedfleet bf16, the mixed workload, engine only
    "h200_large_engine": Figure(
        748_740, "## H200 runs of this stop (2026-12-02, lead)",
        "python3 bench/gpu.py --sections throughput --passes 2 --engines bfloat16:default",
        "748,740 (0.9%)"),
    # the broker's ceiling on the 2-core development machine: shard-sized messages/s, one client process
    "redis_publish": Figure(1_710, "## Every device of a host (issue #17)",
                            "python -m bench.broker_ceiling --rounds 2 --shards 300 --seconds 10", "1,710"),
    "redis_drain": Figure(1_659, "## Every device of a host (issue #17)",
                          "python -m bench.broker_ceiling --rounds 2 --shards 300 --seconds 10", "1,659"),
    "sqs_publish": Figure(80, "## Every device of a host (issue #17)",
                          "python -m bench.broker_ceiling --rounds 2 --shards 300 --seconds 10", "80 (spread 74-80)"),
    "sqs_drain": Figure(30, "## Every device of a host (issue #17)",
                        "python -m bench.broker_ceiling --rounds 2 --shards 300 --seconds 10", "30 (spread 28-30)"),
}


@dataclass(frozen=True)
class DeviceRate:
    """Tokens per second of job time one device sustains for a model class, and where it comes from."""

    tokens_per_s: float
    source: str


def _h200_rates() -> dict[str, DeviceRate]:
    """small: the bulk path measured end to end; large: the measured engine plus the bulk path's
    measured seconds per token outside the engine (the same corpus and shard size, so the same
    per-token share of the per-shard costs)."""
    small = MEASURED["h200_small_bulk"].value
    outside = 1.0 / small - 1.0 / MEASURED["h200_small_engine"].value
    engine = MEASURED["h200_large_engine"].value
    large = 1.0 / (1.0 / engine + outside)
    return {
        "small": DeviceRate(small, f"H200 small models: {small:,.0f} tokens/s measured end to end (MiniLM bf16, "
                                   "bench.bulk, bench/RESULTS.md)"),
        "large": DeviceRate(large, f"H200 large models: 1 / (1/{engine:,.0f} engine + {outside * 1e6:.3f} us/token "
                                   f"outside it) = {large:,.0f} tokens/s (BERT-large bf16 engine and MiniLM bulk, "
                                   "both measured, bench/RESULTS.md)"),
    }


H200_MEASURED = _h200_rates()
#: dense fp16/bf16 tensor-core peak, TFLOP/s (vendor datasheets), for the scaling estimate
H200_PEAK_TFLOPS = 989.0

#: The broker's ceiling (the lower of publish and drain): what one producer or one worker process
#: asks of it at most. Redis itself carries far more; SQS on AWS adds ~10-30 ms per call and scales
#: by consumers.
REDIS_CEILING_MSG_S = int(min(MEASURED["redis_publish"].value, MEASURED["redis_drain"].value))
SQS_CEILING_MSG_S = int(min(MEASURED["sqs_publish"].value, MEASURED["sqs_drain"].value))


@dataclass(frozen=True)
class InstanceType:
    name: str
    device: str
    devices: int
    peak_tflops: float  # per device, dense fp16/bf16
    price_usd_h: float  # on-demand, us-east-1
    measured: bool = False


#: AWS instance types a fleet runs on. Prices: on-demand us-east-1 list prices as recorded in
#: 2026 (check yours: --price TYPE=USD); inf2 peak is per NeuronCore (190 TFLOP/s per chip, 2 cores).
INSTANCE_TYPES = (
    InstanceType("p5en.48xlarge", "H200", 8, 989.0, 63.30, measured=True),
    InstanceType("p5.48xlarge", "H100", 8, 989.0, 55.04),
    InstanceType("g6e.xlarge", "L40S", 1, 362.0, 1.861),
    InstanceType("g6.xlarge", "L4", 1, 121.0, 0.805),
    InstanceType("g5.xlarge", "A10G", 1, 70.0, 1.006),
    InstanceType("inf2.xlarge", "NeuronCore-v2", 2, 95.0, 0.758),
)


@dataclass(frozen=True)
class PlanRow:
    """One instance type's line of the plan."""

    instance: InstanceType
    device_tokens_per_s: float
    how: str  # "measured" or the estimate's arithmetic
    instances: int
    wall_hours: float
    instance_hours: float
    dollars: float
    shards_per_s: float
    shard_seconds: float


def estimate_tokens(texts: list[str]) -> float:
    """Mean tokens per row of a sample: 1.3 per whitespace word plus the special tokens."""
    if not texts:
        return float(SPECIAL_TOKENS)
    words = sum(len(str(t).split()) for t in texts)
    return words * TOKENS_PER_WORD / len(texts) + SPECIAL_TOKENS


def model_class(model: str, default_model: str) -> str:
    """``small`` for the bundled MiniLM (and models named like it), else ``large``: the cautious
    choice for an unknown model, which plans with the BERT-large rate."""
    name = model.lower()
    return "small" if model == default_model or "minilm" in name or "small" in name else "large"


def device_rate(instance: InstanceType, cls: str, override: float | None) -> tuple[float, str]:
    """A device's tokens/s and how it was obtained (measured, given, or the scaling estimate)."""
    if override is not None:
        return override, "given (--device-tokens-per-s)"
    base = H200_MEASURED[cls]
    if instance.measured:
        return base.tokens_per_s, "measured"
    rate = base.tokens_per_s * instance.peak_tflops / H200_PEAK_TFLOPS
    return rate, (f"estimate: {base.tokens_per_s:,.0f} x {instance.peak_tflops:g}/{H200_PEAK_TFLOPS:g} TFLOP/s "
                  f"= {rate:,.0f}")


def parse_prices(entries: list[str]) -> dict[str, float]:
    """``TYPE=USD`` pairs (``--price g6.xlarge=0.70``) into a map; a bad entry names itself."""
    known = {t.name for t in INSTANCE_TYPES}
    prices: dict[str, float] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or name not in known:
            raise BadInput(f"--price {entry!r}: use TYPE=USD with TYPE one of {', '.join(sorted(known))}",
                           param="price")
        try:
            prices[name] = float(value)
        except ValueError:
            raise BadInput(f"--price {entry!r}: {value!r} is not a number of dollars", param="price") from None
    return prices


def plan(total_tokens: float, n_shards: int, deadline_hours: float, cls: str,
         override: float | None = None, prices: dict[str, float] | None = None) -> list[PlanRow]:
    """For each instance type: instances to finish within ``deadline_hours``, the hours and dollars,
    and the shard messages per second the fleet then asks of the broker."""
    if deadline_hours <= 0:
        raise BadInput("--deadline-hours must be positive", param="deadline_hours")
    rows = []
    for instance in INSTANCE_TYPES:
        rate, how = device_rate(instance, cls, override)
        per_instance = rate * instance.devices
        single_hours = total_tokens / per_instance / 3600.0
        instances = max(1, math.ceil(single_hours / deadline_hours))
        wall_hours = single_hours / instances
        price = (prices or {}).get(instance.name, instance.price_usd_h)
        shard_tokens = total_tokens / max(1, n_shards)
        shard_seconds = shard_tokens / rate
        devices = instances * instance.devices
        rows.append(PlanRow(instance, rate, how, instances, wall_hours, single_hours, single_hours * price,
                            shards_per_s=devices / shard_seconds if shard_seconds else 0.0,
                            shard_seconds=shard_seconds))
    return rows


def min_shard_rows(rate: float, tokens_per_row: float) -> int:
    """Rows a shard needs to keep a device busy ``MIN_SHARD_SECONDS``."""
    return max(1, math.ceil(MIN_SHARD_SECONDS * rate / max(tokens_per_row, 1.0)))
