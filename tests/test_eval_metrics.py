"""Evaluation metrics on real photos and tiny random-init models of the real architectures."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel

from eval.metrics import (
    NO_FACE_ID_LOSS,
    NO_FACE_SIMILARITY,
    TINY_OPEN_CLIP_CONFIG,
    ClipImageFeatures,
    ClipScorer,
    IdentityScorer,
    LpipsDiversity,
    OpenClipScorer,
    PickScorer,
    bootstrap_ci,
    frechet_distance,
    image_tensor,
    lpips_weights_file,
    write_random_lpips_backbone,
)
from infu.face import FaceConfig, load_face_analyzer
from infu.sample_corpus import cat_path, portraits

MIXED_SIGN_SEED = 5
"""A tiny CLIP whose cosines for :data:`TEXTS` have both signs, so torchmetrics' clamp at 0 shows."""
TEXTS = ["a man", "a woman smiling", "portrait", "a photo of a person", "red", "a cat"]


@pytest.fixture(scope="module")
def people() -> list[Image.Image]:
    """The six people of the sample corpus (insightface's group photo, cropped)."""
    try:
        return portraits()
    except FileNotFoundError as error:
        pytest.skip(f"sample-corpus photos are not installed: {error}")


@pytest.fixture(scope="module")
def identity_scorer() -> IdentityScorer:
    return IdentityScorer(load_face_analyzer(FaceConfig(backend="dlib")))


class TensorFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the projected tensors, as torchmetrics 1.x expects
    (transformers 5 returns them inside a model output)."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.clip = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_is_torchmetrics_clip_score_over_100(people):
    scorer = ClipScorer.tiny(seed=MIXED_SIGN_SEED)
    ours = scorer.score(people, TEXTS)
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(scorer.model), scorer.processor))
    theirs = []
    for image, text in zip(people, TEXTS, strict=True):
        metric.reset()
        theirs.append(metric(image_tensor(image), text).item() / 100)
    assert (ours > 0).any() and (ours < 0).any()
    np.testing.assert_allclose(theirs, np.maximum(ours, 0), atol=1e-5)
    assert np.all(np.abs(ours) <= 1 + 1e-6)


def test_clip_scorer_loads_a_local_folder(people, tmp_path):
    scorer = ClipScorer.tiny(seed=1)
    scorer.model.save_pretrained(tmp_path)
    scorer.processor.save_pretrained(tmp_path)
    loaded = ClipScorer.from_pretrained(tmp_path)
    np.testing.assert_allclose(loaded.score(people, TEXTS), scorer.score(people, TEXTS), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer.from_pretrained(tmp_path / "absent")


def test_pick_score_is_logit_scale_exp_times_cosine(people):
    scorer = PickScorer.tiny(seed=2)
    inputs = scorer.processor(text=TEXTS, images=people, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = scorer.model(**inputs).logits_per_image  # logit_scale.exp() x image-text cosines
    np.testing.assert_allclose(scorer.score(people, TEXTS), np.diag(logits.numpy()), rtol=1e-5, atol=1e-5)
    cosine = ClipScorer(scorer.model, scorer.processor).score(people, TEXTS)
    scale = scorer.model.logit_scale.exp().item()
    np.testing.assert_allclose(scorer.score(people, TEXTS), scale * cosine, rtol=1e-6)


def test_id_loss_is_zero_for_the_same_photo_and_clearly_positive_across_people(people, identity_scorer):
    people = [people[0], people[2], people[5]]  # a woman, a man, a woman
    references = [identity_scorer.reference(person) for person in people]
    for index, (person, reference) in enumerate(zip(people, references, strict=True)):
        same = identity_scorer.match(reference, person)
        assert same.faces == 1 and same.id_loss == pytest.approx(0.0, abs=1e-5)
        mirrored = identity_scorer.match(reference, ImageOps.mirror(person)).id_loss
        others = [
            identity_scorer.match(reference, other).id_loss for j, other in enumerate(people) if j != index
        ]
        assert mirrored < 0.03 < 0.08 < min(others), (index, mirrored, others)


def test_id_loss_reads_the_largest_face(people, identity_scorer):
    small, large = people[0].reduce(2), people[2]
    canvas = Image.new("RGB", (small.width + large.width, max(small.height, large.height)), (90, 90, 90))
    canvas.paste(small, (0, 0))
    canvas.paste(large, (small.width, 0))
    match = identity_scorer.match(identity_scorer.reference(large), canvas)
    assert match.faces == 2 and match.id_loss < 0.03
    assert match.crop is not None and match.crop.size == (224, 224)


def test_an_image_without_a_face_gets_the_worst_scores(people, identity_scorer):
    reference = identity_scorer.reference(people[0])
    cat = identity_scorer.match(reference, Image.open(cat_path()))
    assert (cat.id_loss, cat.faces, cat.crop, cat.similarity) == (
        NO_FACE_ID_LOSS,
        0,
        None,
        NO_FACE_SIMILARITY,
    )
    clip_i = OpenClipScorer.tiny().clip_i([cat.crop, reference.crop], [reference.crop, reference.crop])
    np.testing.assert_allclose(clip_i, [NO_FACE_SIMILARITY, 1.0], atol=1e-5)


def test_open_clip_t_and_i_are_cosines(people):
    scorer = OpenClipScorer.tiny(seed=3)
    with torch.inference_mode():
        images = scorer.model.encode_image(
            torch.stack([scorer.preprocess(p) for p in people]), normalize=True
        )
        texts = scorer.model.encode_text(scorer.tokenizer(TEXTS), normalize=True)
    np.testing.assert_allclose(scorer.clip_t(people, TEXTS), (images * texts).sum(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        scorer.clip_i(people[:2], people[1:3]), (images[:2] * images[1:3]).sum(1).numpy(), atol=1e-5
    )


def test_open_clip_scorer_loads_an_architecture_and_a_local_checkpoint(people, tmp_path):
    tiny = OpenClipScorer.tiny(seed=4)
    config_path = tmp_path / "tiny-test-ViT-H-14.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    weights = tmp_path / "open_clip_model.pt"
    torch.save(tiny.model.state_dict(), weights)
    loaded = OpenClipScorer.from_checkpoint("tiny-test-ViT-H-14", weights)
    np.testing.assert_allclose(loaded.clip_t(people, TEXTS), tiny.clip_t(people, TEXTS), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        OpenClipScorer.from_checkpoint("tiny-test-ViT-H-14", tmp_path / "absent.pt")


def test_fid_is_zero_for_one_set_and_positive_between_sets(people):
    features = ClipImageFeatures(ClipScorer.tiny(seed=0))
    assert frechet_distance(people, people, features) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(people[:3], people[3:], features) > 1e-3


def test_lpips_never_downloads_and_measures_diversity(people, tmp_path):
    with pytest.raises(FileNotFoundError, match=lpips_weights_file("alex")):
        LpipsDiversity(tmp_path, "alex")
    write_random_lpips_backbone(tmp_path, "squeeze", seed=0)
    lpips = LpipsDiversity(tmp_path, "squeeze")
    images = [person.resize((96, 96)) for person in people[:3]]
    np.testing.assert_allclose(lpips.distances(images[:1], images[:1]), [0.0], atol=1e-6)
    pairwise = lpips.distances([images[0], images[0], images[1]], [images[1], images[2], images[2]])
    assert pairwise.shape == (3,) and pairwise.min() > 0
    assert lpips.diversity(images) == pytest.approx(pairwise.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="one size"):
        lpips.diversity([images[0], people[0]])


def _crossed(prompts: int, identities: int, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Scores with a prompt effect, an identity effect and noise, one per (prompt, identity) cell."""
    rng = np.random.default_rng(seed)
    prompt_effect, identity_effect = rng.normal(0, 0.05, prompts), rng.normal(0, 0.05, identities)
    prompt_of = [p for p in range(prompts) for _ in range(identities)]
    identity_of = [i for _ in range(prompts) for i in range(identities)]
    values = (
        0.3 + prompt_effect[prompt_of] + identity_effect[identity_of] + rng.normal(0, 0.02, len(prompt_of))
    )
    return values, prompt_of, identity_of


def test_bootstrap_ci_brackets_the_mean_is_seeded_and_narrows_with_data():
    values, prompt_of, identity_of = _crossed(10, 4, seed=0)
    interval = bootstrap_ci(values, prompt_of, identity_of, n=1000, seed=7)
    assert interval.low < interval.mean < interval.high
    assert interval.mean == pytest.approx(values.mean()) and interval.count == 40
    assert bootstrap_ci(values, prompt_of, identity_of, n=1000, seed=7) == interval
    assert bootstrap_ci(values, prompt_of, identity_of, n=1000, seed=8) != interval

    more = _crossed(40, 16, seed=0)  # 4x the prompts and the identities: about half the width
    narrower = bootstrap_ci(*more, n=1000, seed=7)
    assert narrower.high - narrower.low < 0.7 * (interval.high - interval.low)


def test_bootstrap_over_prompts_and_identities_is_wider_than_over_images():
    values, prompt_of, identity_of = _crossed(40, 8, seed=1)
    clustered = bootstrap_ci(values, prompt_of, identity_of, seed=0)
    per_image = bootstrap_ci(values, seed=0)
    assert per_image.low < per_image.mean < per_image.high
    assert clustered.high - clustered.low > 1.5 * (per_image.high - per_image.low)
    with pytest.raises(ValueError, match="labels"):
        bootstrap_ci(values, prompt_of[:-1])
