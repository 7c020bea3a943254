"""Watermark backends: the text-overlay detector on the sample corpus, LAION's classifier architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from infu.quality.torch_utils import save_weights
from infu.quality.watermark import (
    IMAGENET_MEAN,
    LAION_INPUT_SIZE,
    TINY_BACKBONE,
    WATERMARK_THRESHOLD,
    LaionWatermarkClassifier,
    TextOverlayDetector,
)
from infu.sample_corpus import build_sample_corpus

CLEAN_CORPUS_IMAGES = [
    *(f"people/person_{index}.jpg" for index in range(6)),
    "people/astronaut.png",
    "variants/grayscale.jpg",
    "variants/cmyk.jpg",
    "variants/two_people.jpg",
    "variants/exif_rotated.jpg",
    "variants/cat.png",
]
MARGIN = 0.2
LAION_HEAD_LAYERS = ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(out)
    return out


@pytest.fixture(scope="module")
def detector() -> TextOverlayDetector:
    return TextOverlayDetector()


def _tiled_text(image: Image.Image, fill: tuple[int, int, int, int]) -> Image.Image:
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=image.width // 12)
    for y in range(0, image.height, image.height // 6):
        draw.text((5, y), "SAMPLE PREVIEW  SAMPLE", font=font, fill=fill)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def test_tiled_stockphoto_text_scores_high_and_the_same_portrait_without_it_low(
    corpus: Path, detector: TextOverlayDetector
):
    watermarked = detector.score([Image.open(corpus / "variants/watermark.jpg")])[0]
    clean = detector.score([Image.open(corpus / "people/person_2.jpg")])[0]
    assert watermarked >= WATERMARK_THRESHOLD + MARGIN
    assert clean <= WATERMARK_THRESHOLD - MARGIN


@pytest.mark.parametrize("name", CLEAN_CORPUS_IMAGES)
def test_clean_corpus_images_score_below_the_threshold_with_margin(
    corpus: Path, detector: TextOverlayDetector, name: str
):
    assert detector.score([Image.open(corpus / name)])[0] <= WATERMARK_THRESHOLD - MARGIN


def test_dark_overlaid_text_is_detected_too(corpus: Path, detector: TextOverlayDetector):
    portrait = Image.open(corpus / "people/person_4.jpg")
    scores = detector.score(
        [_tiled_text(portrait, (0, 0, 0, 130)), _tiled_text(portrait, (255, 255, 255, 130))]
    )
    assert (scores >= WATERMARK_THRESHOLD).all()


def test_text_overlay_scores_are_deterministic_and_in_range(corpus: Path, detector: TextOverlayDetector):
    images = [Image.open(corpus / name) for name in ("variants/watermark.jpg", "variants/cmyk.jpg")]
    first, second = detector.score(images), detector.score(images)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and ((first >= 0) & (first <= 1)).all()
    assert detector.score([]).shape == (0,)


def test_flat_and_noise_images_have_no_text(detector: TextOverlayDetector):
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    scores = detector.score([Image.new("RGB", (300, 200), (90, 120, 30)), Image.fromarray(noise)])
    np.testing.assert_array_equal(scores, [0.0, 0.0])


@pytest.fixture(scope="module")
def tiny_classifier() -> LaionWatermarkClassifier:
    return LaionWatermarkClassifier.tiny(seed=0, batch_size=2)


def test_laion_classifier_keeps_laions_head_and_the_tiny_backbone_is_small(
    tiny_classifier: LaionWatermarkClassifier,
):
    head = tiny_classifier.network.classifier
    assert [type(layer).__name__ for layer in head] == LAION_HEAD_LAYERS
    assert (head[0].out_features, head[3].out_features, head[5].out_features) == (625, 256, 2)
    assert sum(parameter.numel() for parameter in tiny_classifier.network.parameters()) < 1_000_000


def test_laion_preprocessing_is_256_square_imagenet_normalised():
    mean_colour = tuple(int(round(channel * 255)) for channel in IMAGENET_MEAN)
    batch = LaionWatermarkClassifier.preprocess(
        [Image.new("RGB", (640, 480), mean_colour), Image.new("L", (50, 90))]
    )
    assert batch.shape == (2, 3, LAION_INPUT_SIZE, LAION_INPUT_SIZE)
    assert batch[0].abs().max() < 0.01
    assert batch[1].max() < -1.5


def test_laion_classifier_probabilities_are_softmax_of_the_watermark_class(
    tiny_classifier: LaionWatermarkClassifier, corpus: Path
):
    images = [
        Image.open(corpus / name)
        for name in ("variants/watermark.jpg", "variants/cmyk.jpg", "people/astronaut.png")
    ]
    scores = tiny_classifier.score(images)
    with torch.inference_mode():
        logits = tiny_classifier.network(LaionWatermarkClassifier.preprocess(images))
    expected = torch.softmax(logits, dim=1)[:, 0].numpy()
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_laion_classifier_round_trips_through_a_state_dict_file(tmp_path: Path, corpus: Path):
    original = LaionWatermarkClassifier.tiny(seed=4)
    path = save_weights(original.network, tmp_path / "watermark.pt")
    loaded = LaionWatermarkClassifier.from_checkpoint(path, backbone=TINY_BACKBONE)
    image = [Image.open(corpus / "people/person_0.jpg")]
    np.testing.assert_array_equal(loaded.score(image), original.score(image))
    assert not np.array_equal(LaionWatermarkClassifier.tiny(seed=5).score(image), original.score(image))


def test_laion_checkpoint_must_match_the_backbone(tmp_path: Path):
    path = save_weights(LaionWatermarkClassifier.tiny().network, tmp_path / "watermark.safetensors")
    with pytest.raises(ValueError, match="watermark.safetensors"):
        LaionWatermarkClassifier.from_checkpoint(path, backbone="efficientnet_b0")
