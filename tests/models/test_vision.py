"""CLIP and SigLIP: text and image embeddings against transformers' ``get_text_features`` /
``get_image_features``, on tiny random CLIPModel / SiglipModel folders with their processor
configs (``tests.families.save_image_text``), images generated as PNG and JPEG of several sizes.
The reference preprocesses with the folder's processor (PIL path) and tokenizes with its tokenizer
(SigLIP: padded to the maximum length, as its processor is used); it runs the model one call per
modality. Each bad image case fails alone with its reason."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.jobs import Options

from tests.families import image_bytes, save_image_text
from tests.fixtures_extra import make_engine, sample_texts

TEXTS = [t[:200] for t in sample_texts(6)] + ["a photo of a cat"]
IMAGES = [image_bytes(40, 30, "PNG", 1), image_bytes(64, 64, "JPEG", 2), image_bytes(17, 50, "PNG", 3),
          image_bytes(32, 32, "JPEG", 4)]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def reference(path: Path, family: str, texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    import io

    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    processor = AutoImageProcessor.from_pretrained(str(path), use_fast=False)
    with torch.no_grad():
        if family == "siglip":
            enc = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
            text = model.get_text_features(input_ids=enc["input_ids"])
        else:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            text = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        image = model.get_image_features(pixel_values=pixels["pixel_values"])
    pick = lambda out: (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()  # noqa: E731
    return pick(text), pick(image)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    family = str(request.param)
    folder = save_image_text(tmp_path_factory.mktemp("vision") / f"tiny-{family}", family)
    engine = make_engine(folder, max_batch_tokens=256)
    yield family, folder, engine
    engine.stop()


def test_texts_and_images_match_transformers(family_engine) -> None:  # type: ignore[no-untyped-def]
    family, folder, engine = family_engine
    want_text, want_image = reference(folder, family, TEXTS, IMAGES)
    inputs = [*TEXTS, *({"image": data_uri(b)} for b in IMAGES)]
    result = engine.run(inputs, Options(normalize=False), timeout=120)
    assert not result.errors
    np.testing.assert_allclose(result.values[:len(TEXTS)], want_text, atol=2e-5)
    np.testing.assert_allclose(result.values[len(TEXTS):], want_image, atol=2e-5)
    normalized = engine.run(inputs[-2:], timeout=120).values  # the default: normalized, as there are no ST files
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1, atol=1e-5)


def test_each_bad_image_fails_alone(family_engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _, _, engine = family_engine
    monkeypatch.setenv("EMBEDFLEET_IMAGE_MAX_PIXELS", str(100 * 100))
    huge = image_bytes(200, 120, "PNG", 5)
    truncated = IMAGES[1][: len(IMAGES[1]) // 2]
    inputs = [{"image": data_uri(IMAGES[0])}, {"image": data_uri(huge)}, {"image": data_uri(b"not an image")},
              {"image": "data:image/png;base64,@@@"}, {"image": data_uri(truncated, "image/jpeg")},
              {"image": "/etc/hosts"}, {"image": 42}, "a text in between", {"image": data_uri(IMAGES[2])}]
    result = engine.run(inputs, timeout=120)
    assert sorted(result.errors) == [1, 2, 3, 4, 5, 6], result.errors
    assert "200 x 120 = 24000 pixels, over the limit of 10000 (EMBEDFLEET_IMAGE_MAX_PIXELS)" in result.errors[1]
    assert "not an image PIL can read" in result.errors[2]
    assert "not valid base64" in result.errors[3]
    assert "could not be decoded" in result.errors[4]
    assert "data: URI or an http(s) URL" in result.errors[5] and "not int" in result.errors[6]
    assert np.abs(result.values[[0, 7, 8]]).sum(axis=1).min() > 0 and not result.values[1:7].any()


def test_url_downloads_can_be_turned_off(family_engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _, _, engine = family_engine
    monkeypatch.setenv("EMBEDFLEET_IMAGE_FETCH", "0")
    result = engine.run([{"image": "http://169.254.169.254/latest/meta-data/"}], timeout=60)
    assert "EMBEDFLEET_IMAGE_FETCH is off" in result.errors[0]


def test_images_on_a_text_model_are_refused_by_name(tiny_embed_model: Path) -> None:
    engine = make_engine(tiny_embed_model)
    try:
        result = engine.run(["text", {"image": data_uri(IMAGES[0])}], timeout=60)
    finally:
        engine.stop()
    assert list(result.errors) == [1] and "embeds text only" in result.errors[1]


def test_backends_that_cannot_embed_images_refuse(tmp_path: Path) -> None:
    from producer.errors import BadInput
    from worker.models.loading import transformers_only
    from worker.models.resolve import describe

    info = describe(str(save_image_text(tmp_path / "clip")))
    assert info.modalities == ("text", "image") and info.dims == 24 and info.family == "clip"
    with pytest.raises(BadInput, match="image-text model .* use --backend torch"):
        transformers_only(info, "onnx")
