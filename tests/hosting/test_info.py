"""What a worker reports for /v1/models: the serving details and what the model is (its family,
pooling, prompts, template) for every hosted model, and the reason for every refused one."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.errors import UnsupportedModel
from worker.hosting import registry as runtime
from worker.hosting.info import describe_engine, hosted_models
from worker.models.resolve import describe

from tests.families import save_jina, tiny_jina_model  # noqa: F401  (fixture)
from tests.fixtures_extra import make_engine


def test_a_hosted_model_reports_what_it_is(tiny_jina_model: Path) -> None:  # noqa: F811
    engine = make_engine(tiny_jina_model)
    try:
        engines = runtime.Registry()
        engines.register(engine, "jina")
        [card] = hosted_models(engines)
        assert card["device"] == "cpu"
        engines.set_device_label("cpu:1")  # as an engine process of a multi-device host names it
        assert describe_engine(engine, engines)["device"] == "cpu:1"
        assert (card["family"], card["kind"], card["pooling"], card["dimensions"], card["max_length"]) == \
            ("jina-bert-v2", "embed", "mean", 32, 8192)
        assert card["faithful"] is True and card["architecture"] == "JinaBertForMaskedLM"
        assert card["default_prompt_name"] is None and card["prompt_template"] is None
    finally:
        engine.stop()


def test_a_refused_model_reports_why(tmp_path: Path) -> None:
    engines = runtime.Registry()  # a worker's own: no other worker's models in it
    info = describe(str(save_jina(tmp_path / "incomplete", drop=["encoder.layer.0.mlp.wo.bias"])))
    engines.refuse(info, UnsupportedModel("model 'incomplete' cannot be served faithfully: encoder.layer.0.mlp.wo.bias"))
    [card] = hosted_models(engines)
    assert card["faithful"] is False and "encoder.layer.0.mlp.wo.bias" in card["refusal"]
    assert card["queue"] == "embed.incomplete" and card["family"] == "jina-bert-v2"
    with pytest.raises(UnsupportedModel, match="encoder.layer.0.mlp.wo.bias"):
        engines.engine_for("incomplete")
