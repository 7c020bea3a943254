"""CLIP embeddings and QualityScorer: shapes, ranges, determinism, loading the ``full`` variant's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from infu.quality import ClipImageEmbedder, QualityConfig, QualityScorer
from infu.quality.aesthetic import AestheticHead
from infu.quality.clip import TINY_PROJECTION_DIM, tiny_clip_config
from infu.quality.torch_utils import save_weights, seeded
from infu.sample_corpus import _watermarked, astronaut_path, portraits

SCORE_KEYS = {"aesthetic", "nsfw", "watermark", "clip_embedding"}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    people = portraits()
    return [
        people[0],
        _watermarked(people[2]),
        people[3].convert("L"),
        people[4].convert("CMYK"),
        Image.open(astronaut_path()),
    ]


@pytest.fixture(scope="module")
def tiny_scorer() -> QualityScorer:
    return QualityScorer(QualityConfig(batch_size=2))


def test_scores_have_one_value_per_image_in_range(tiny_scorer: QualityScorer, images: list[Image.Image]):
    scores = tiny_scorer.score(images)
    assert set(scores) == SCORE_KEYS
    for key in ("aesthetic", "nsfw", "watermark"):
        assert scores[key].shape == (5,) and scores[key].dtype == np.float32
        assert np.isfinite(scores[key]).all()
    assert ((scores["nsfw"] >= 0) & (scores["nsfw"] <= 1)).all()
    assert ((scores["watermark"] >= 0) & (scores["watermark"] <= 1)).all()
    assert scores["clip_embedding"].shape == (5, TINY_PROJECTION_DIM)
    np.testing.assert_allclose(np.linalg.norm(scores["clip_embedding"], axis=1), 1.0, atol=1e-5)


def test_tiny_embedded_profile_flags_only_the_watermarked_portrait(
    tiny_scorer: QualityScorer, images: list[Image.Image]
):
    from infu.quality import WATERMARK_THRESHOLD

    flagged = tiny_scorer.score(images)["watermark"] >= WATERMARK_THRESHOLD
    assert flagged.tolist() == [False, True, False, False, False]


def test_batching_does_not_change_scores(tiny_scorer: QualityScorer, images: list[Image.Image]):
    whole = QualityScorer(QualityConfig(batch_size=8)).score(images)
    batched = tiny_scorer.score(images)
    for key in SCORE_KEYS:
        np.testing.assert_allclose(batched[key], whole[key], atol=1e-5)


def test_equal_configs_score_identically_without_touching_the_global_rng(images: list[Image.Image]):
    state = torch.get_rng_state()
    first = QualityScorer(QualityConfig(tiny_seed=3)).score(images[:2])
    second = QualityScorer(QualityConfig(tiny_seed=3)).score(images[:2])
    other = QualityScorer(QualityConfig(tiny_seed=4)).score(images[:2])
    assert torch.equal(torch.get_rng_state(), state)
    for key in SCORE_KEYS:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.allclose(first["clip_embedding"], other["clip_embedding"])


def test_an_empty_batch_gives_empty_columns(tiny_scorer: QualityScorer):
    scores = tiny_scorer.score([])
    assert {key: value.shape for key, value in scores.items()} == {
        "aesthetic": (0,),
        "nsfw": (0,),
        "watermark": (0,),
        "clip_embedding": (0, TINY_PROJECTION_DIM),
    }


def test_laion_watermark_backend_runs_in_the_tiny_variant(images: list[Image.Image]):
    scores = QualityScorer(QualityConfig(watermark_backend="laion")).score(images[:2])["watermark"]
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_resources_ask_for_a_gpu_only_on_cuda():
    assert QualityScorer.resources(QualityConfig()) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert QualityScorer.resources(QualityConfig(device="cuda:1"))["num_gpus"] == 1.0


def _save_full_clip_model(folder: Path, seed: int) -> CLIPModel:
    """A tiny *full* CLIP (text + vision), saved as openai/clip-vit-large-patch14 is: model + processor."""
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 100,
        },
        vision_config=tiny_clip_config().to_dict(),
        projection_dim=TINY_PROJECTION_DIM,
    )
    with seeded(seed):
        model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    ClipImageEmbedder.tiny().processor.save_pretrained(folder)
    return model


def test_clip_embedder_loads_a_full_clip_folder_and_matches_its_image_features(
    tmp_path: Path, images: list[Image.Image]
):
    model = _save_full_clip_model(tmp_path / "clip", seed=11)
    embedder = ClipImageEmbedder.from_pretrained(tmp_path / "clip")
    with torch.inference_mode():
        pixels = embedder.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        features = model.get_image_features(pixel_values=pixels["pixel_values"])
    features = getattr(features, "pooler_output", features)
    expected = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-5)


def test_full_variant_loads_every_file_and_reproduces_the_saved_models(
    tmp_path: Path, tiny_scorer: QualityScorer, images: list[Image.Image]
):
    tiny_scorer.embedder.model.save_pretrained(tmp_path / "clip")
    tiny_scorer.embedder.processor.save_pretrained(tmp_path / "clip")
    config = QualityConfig(
        variant="full",
        clip_model=tmp_path / "clip",
        aesthetic_head=save_weights(tiny_scorer.aesthetic, tmp_path / "aesthetic.pth"),
        nsfw_head=save_weights(tiny_scorer.nsfw, tmp_path / "nsfw.safetensors"),
        watermark_backend="text_overlay",
    )
    full, tiny = QualityScorer(config).score(images), tiny_scorer.score(images)
    for key in SCORE_KEYS:
        np.testing.assert_allclose(full[key], tiny[key], atol=1e-6)


def test_full_variant_rejects_a_head_that_does_not_fit_the_clip_model(
    tmp_path: Path, tiny_scorer: QualityScorer
):
    tiny_scorer.embedder.model.save_pretrained(tmp_path / "clip")
    tiny_scorer.embedder.processor.save_pretrained(tmp_path / "clip")
    config = QualityConfig(
        variant="full",
        clip_model=tmp_path / "clip",
        aesthetic_head=save_weights(AestheticHead.tiny(TINY_PROJECTION_DIM + 1), tmp_path / "aesthetic.pth"),
        nsfw_head=save_weights(tiny_scorer.nsfw, tmp_path / "nsfw.pth"),
        watermark_backend="text_overlay",
    )
    with pytest.raises(ValueError, match="aesthetic head expects 33-D"):
        QualityScorer(config)
