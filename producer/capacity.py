"""The capacity plan ``embedfleet plan`` prints: instances, hours and dollars per instance type for
a corpus, and the broker load that implies.

Why these numbers can be trusted as far as they go: the per-device rate of the H200 is measured
on this code (the engine by bench/gpu.py, bulk through Redis and Parquet by bench/bulk.py, on the
lent H200 on 2026-12-01, as ../shared/BENCH.md records them; bench/RESULTS.md holds the H100 run of
the same benchmark), and every other device's rate is that figure scaled by
its dense fp16/bf16 tensor peak relative to the H200, printed as an estimate with the arithmetic.
The corpus's tokens are estimated from a sample of its rows (1.3 WordPiece tokens per
whitespace word, plus the two special tokens), so the plan needs no model and no worker.

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
class DeviceRate:
    """Tokens per second of job time one device sustains for a model class, and where it comes from."""

    tokens_per_s: float
    source: str


#: Measured on the H200 (bulk through Redis + Parquet = 69% of the bare engine, 2026-12-01,
#: ../shared/BENCH.md "Measured so far"; engine figures: bench/gpu.py on the lent H200).
#: small: the bundled all-MiniLM-L6-v2 (engine 584k tokens/s on short texts; x 0.69);
#: large: the bge-large architecture (BERT-large, mixed workload 581-605k bare; x 0.69 of 581k).
H200_MEASURED = {
    "small": DeviceRate(584_000 * 0.69, "H200 measured: MiniLM engine 584k tokens/s x 69% bulk efficiency"),
    "large": DeviceRate(581_000 * 0.69, "H200 measured: BERT-large mixed 581k tokens/s x 69% bulk efficiency"),
}
#: dense fp16/bf16 tensor-core peak, TFLOP/s (vendor datasheets), for the scaling estimate
H200_PEAK_TFLOPS = 989.0


#: The broker's ceiling measured by bench/broker_ceiling.py on the 2-core development machine
#: (bench/RESULTS.md, "Every device of a host"): shard-sized messages per second one Python client
#: process publishes, and one consumer drains with acks (the lower of the two best passes). Redis
#: itself carries far more; these bound what one producer or one worker process asks of it.
REDIS_CEILING_MSG_S = 1_659
SQS_CEILING_MSG_S = 30  # one kombu consumer on moto; AWS adds ~10-30 ms per call, and scales by consumers


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
