"""The capacity plan: token estimate, per-type arithmetic, prices, and the `plan` command's table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from producer import capacity
from producer.cli import app
from producer.errors import BadInput


def test_tokens_are_estimated_per_word_plus_special_tokens() -> None:
    assert capacity.estimate_tokens(["one two three four", "five six"]) == pytest.approx(3 * 1.3 + 2)
    assert capacity.estimate_tokens([]) == 2


def test_the_plan_is_arithmetic_on_the_measured_rate() -> None:
    measured = capacity.H200_MEASURED["large"].tokens_per_s
    total = measured * 8 * 3600 * 2.5  # 2.5 hours of one 8-GPU H200 instance
    rows = {r.instance.name: r for r in capacity.plan(total, n_shards=1000, deadline_hours=1.0, cls="large")}
    h200 = rows["p5en.48xlarge"]
    assert h200.how == "measured" and h200.device_tokens_per_s == measured
    assert h200.instances == 3 and h200.instance_hours == pytest.approx(2.5)
    assert h200.wall_hours == pytest.approx(2.5 / 3) and h200.dollars == pytest.approx(2.5 * 63.30)
    assert h200.shard_seconds == pytest.approx(total / 1000 / measured)
    assert h200.shards_per_s == pytest.approx(24 / h200.shard_seconds)
    l4 = rows["g6.xlarge"]
    assert l4.device_tokens_per_s == pytest.approx(measured * 121 / 989)
    assert l4.how.startswith("estimate: ") and "x 121/989 TFLOP/s" in l4.how
    given = capacity.plan(total, 1000, 1.0, "large", override=1000.0, prices={"g6.xlarge": 0.5})
    assert all(r.device_tokens_per_s == 1000.0 for r in given)
    cheap = next(r for r in given if r.instance.name == "g6.xlarge")
    assert cheap.dollars == pytest.approx(cheap.instance_hours * 0.5)


def test_prices_and_model_classes() -> None:
    assert capacity.parse_prices(["g6.xlarge=0.7"]) == {"g6.xlarge": 0.7}
    with pytest.raises(BadInput, match="TYPE one of"):
        capacity.parse_prices(["g9.huge=1"])
    with pytest.raises(BadInput, match="not a number"):
        capacity.parse_prices(["g6.xlarge=cheap"])
    assert capacity.model_class("all-MiniLM-L6-v2", "all-MiniLM-L6-v2") == "small"
    assert capacity.model_class("BAAI/bge-large-en-v1.5", "all-MiniLM-L6-v2") == "large"
    assert capacity.min_shard_rows(10_000.0, 100.0) == 1000


def test_plan_prints_the_capacity_table_and_keeps_its_json_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(500)],
                             "text": [" ".join(["word"] * 98) for _ in range(500)]}), corpus)
    result = CliRunner().invoke(app, ["plan", str(corpus), "--out", str(tmp_path / "job"), "--shard-rows", "100",
                                      "--deadline-hours", "2", "--price", "g5.xlarge=0.5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["array_size"] == 5
    text = " ".join(result.output.split())
    assert "~64,700 tokens (~129 per row" in text and "done within 2 h" in text
    for name in ("p5en.48xlarge", "g6e.xlarge", "inf2.xlarge"):
        assert name in text
    assert "g6.xlarge: estimate:" in text and "shard messages/s" in text
    assert "--shard-rows" in text  # 100-row shards are far under 10 s on any device
    bad = CliRunner().invoke(app, ["plan", str(corpus), "--out", str(tmp_path / "job2"), "--price", "x=1"])
    assert bad.exit_code == 2 and "--price 'x=1'" in " ".join(bad.output.split())


RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"


def section(heading: str) -> str:
    """The text of the bench/RESULTS.md section whose heading starts with ``heading``."""
    text = RESULTS.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    following = [text.find(f"\n{h} ", start + len(heading)) for h in ("##", level)]
    ends = [e for e in following if e > 0]
    return text[start:min(ends) if ends else len(text)]


def test_every_figure_is_the_one_bench_results_records_under_its_section_and_command() -> None:
    for name, figure in capacity.MEASURED.items():
        body = section(figure.section)
        assert figure.recorded in body, f"{name}: {figure.recorded!r} not in {figure.section!r}"
        assert f"{figure.value:,.0f}" in figure.recorded, f"{name}: the value is not the figure recorded"
        command = " ".join(body.split())
        assert all(part in command for part in figure.command.split(" --")), f"{name}: command not in the section"


def test_the_plan_starts_from_the_recorded_h200_figures_with_its_arithmetic() -> None:
    # by hand, from bench/RESULTS.md: MiniLM bulk 386,911 (engine 2,305,931); BERT-large engine 748,740
    assert capacity.H200_MEASURED["small"].tokens_per_s == 386_911
    outside = 1 / 386_911 - 1 / 2_305_931  # 2.151 us per token outside the engine
    assert capacity.H200_MEASURED["large"].tokens_per_s == pytest.approx(1 / (1 / 748_740 + outside))
    assert capacity.H200_MEASURED["large"].tokens_per_s == pytest.approx(286_821, abs=1)
    assert "2.151 us/token" in capacity.H200_MEASURED["large"].source
    assert capacity.REDIS_CEILING_MSG_S == 1_659 and capacity.SQS_CEILING_MSG_S == 30

    # 1e9 tokens of MiniLM in 10,000 shards, within 1 h
    rows = {r.instance.name: r for r in capacity.plan(1e9, n_shards=10_000, deadline_hours=1.0, cls="small")}
    h200 = rows["p5en.48xlarge"]  # 8 x 386,911 = 3,095,288 tokens/s: 323.07 s of one instance
    assert h200.instance_hours == pytest.approx(1e9 / 3_095_288 / 3600)
    assert h200.instances == 1 and h200.dollars == pytest.approx(1e9 / 3_095_288 / 3600 * 63.30)
    assert h200.shard_seconds == pytest.approx(1e5 / 386_911)  # 0.258 s per shard
    assert h200.shards_per_s == pytest.approx(8 * 386_911 / 1e5)  # 30.95 shard messages/s, 1.9% of Redis's
    a10g = rows["g5.xlarge"]  # 386,911 x 70/989 = 27,385 tokens/s, one device: 10.14 h, so 11 instances
    assert a10g.device_tokens_per_s == pytest.approx(386_911 * 70 / 989)
    assert a10g.how == "estimate: 386,911 x 70/989 TFLOP/s = 27,385"
    assert a10g.instances == 11 and a10g.instance_hours == pytest.approx(1e9 / (386_911 * 70 / 989) / 3600)
