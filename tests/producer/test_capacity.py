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
