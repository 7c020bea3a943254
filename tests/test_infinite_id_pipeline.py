"""Infinite-ID SDXL pipeline on tiny models: face photos, two-stream sampling, identity mixing, loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from infu.face import FaceConfig, load_face_analyzer
from infu.model.infinite_id.pipeline import InfiniteIdPipeline
from infu.model.infinite_id.tiny import tiny_sdxl_components, write_tiny_open_clip
from infu.sample_corpus import build_sample_corpus

SEED = 3
STEPS = 2
PROMPT = "a portrait photo"


@pytest.fixture(scope="module")
def analyzer():
    return load_face_analyzer(FaceConfig())


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(corpus)
    return corpus / "people"


@pytest.fixture(scope="module")
def pipe(analyzer) -> InfiniteIdPipeline:
    pipeline = InfiniteIdPipeline.tiny(SEED, face_analyzer=analyzer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tokens(pipe: InfiniteIdPipeline, seed: int) -> torch.Tensor:
    shape = (pipe.adapter.encoder.num_tokens, pipe.unet.config.cross_attention_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(pipe, seed: int = 0, prompt: str | list[str] = PROMPT, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_image_of_the_requested_size_from_a_face_photo_reproducibly(pipe, people):
    photo = people / "person_0.jpg"
    image = pipe(
        PROMPT,
        id_images=photo,
        width=96,
        height=64,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert isinstance(image, Image.Image) and image.size == (96, 64)

    first = run(pipe, id_images=photo)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(run(pipe, id_images=photo), first)
    assert not np.array_equal(run(pipe, seed=1, id_images=photo), first)
    assert not np.array_equal(run(pipe, id_images=people / "person_1.jpg"), first)
    assert not np.array_equal(run(pipe, id_images=photo, adain=None), first)
    assert not np.array_equal(run(pipe, id_images=photo, mode="plain", adain=None), first)


def test_without_identity_the_identity_stream_is_plain_sdxl(pipe):
    sdxl = StableDiffusionXLPipeline(**tiny_sdxl_components(SEED), add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    expected = run(sdxl, guidance_scale=5.0)
    plain = run(pipe, id_embeddings=tokens(pipe, 0), identity_scale=0.0, mode="plain", adain=None)
    np.testing.assert_allclose(plain, expected, atol=1e-5)
    # Both streams start from the same noise: without identity the identity stream's own keys equal the
    # text stream's, so mixed attention changes nothing either.
    mixed = run(pipe, id_embeddings=tokens(pipe, 0), identity_scale=0.0, mode="mixed", adain=None)
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    assert not np.allclose(run(pipe, id_embeddings=tokens(pipe, 0), mode="plain", adain=None), expected)


def test_identity_mixing(pipe, people):
    first, second = people / "person_0.jpg", people / "person_1.jpg"
    alone = run(pipe, id_images=first)
    np.testing.assert_array_equal(run(pipe, id_images=[first, second], id_weights=[1, 0]), alone)
    half = run(pipe, id_images=[first, second], id_weights=[1, 1])
    assert not np.array_equal(half, alone)
    np.testing.assert_array_equal(run(pipe, id_images=[first, second]), half)

    mixed = pipe.identity_tokens(
        id_embeddings=torch.stack([tokens(pipe, 0), tokens(pipe, 1)]), id_weights=[3, 1]
    )
    torch.testing.assert_close(mixed[0], 0.75 * tokens(pipe, 0) + 0.25 * tokens(pipe, 1))
    with pytest.raises(ValueError, match="2 identities"):
        pipe.identity_tokens(id_images=[first, second], id_weights=[1])


def test_batches_of_prompts(pipe):
    identity = tokens(pipe, 0)
    batch = run(pipe, prompt=[PROMPT, "a painting"], id_embeddings=identity)
    assert batch.shape == (2, 64, 64, 3) and not np.array_equal(batch[0], batch[1])
    several = run(pipe, prompt=[PROMPT, "a painting"], id_embeddings=identity, num_images_per_prompt=2)
    assert several.shape == (4, 64, 64, 3)


def test_callback_on_step_end_sees_both_streams_every_step(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors["latents"].shape)))
        return tensors

    run(pipe, id_embeddings=tokens(pipe, 0), num_inference_steps=3, callback_on_step_end=record)
    assert [step for step, _, _ in seen] == [0, 1, 2]
    assert [timestep for _, timestep, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert {shape for _, _, shape in seen} == {(2, 4, 8, 8)}  # [identity stream; text stream]


def test_inputs_are_checked(pipe, analyzer, people):
    with pytest.raises(ValueError, match="exactly one of id_images and id_embeddings"):
        run(pipe)
    with pytest.raises(ValueError, match="attention mode must be one of"):
        run(pipe, id_embeddings=tokens(pipe, 0), mode="shared")
    with pytest.raises(ValueError, match="use mode 'mixed' or 'mutual'"):
        run(pipe, id_embeddings=tokens(pipe, 0), mode="plain", adain="mean")
    no_faces = InfiniteIdPipeline.tiny(SEED)
    with pytest.raises(ValueError, match="need a face analyzer"):
        no_faces.identity_tokens(id_images=people / "person_0.jpg")
    with pytest.raises(ValueError, match="128-D embeddings but the adapter's face mapper expects 512-D"):
        InfiniteIdPipeline(**{**no_faces.components, "face_analyzer": analyzer})


def test_from_local_folders_equals_the_tiny_pipeline(pipe, analyzer, tmp_path):
    StableDiffusionXLPipeline(**tiny_sdxl_components(SEED), add_watermarker=False).save_pretrained(
        tmp_path / "sdxl"
    )
    pipe.adapter.save_pretrained(tmp_path / "adapter")
    write_tiny_open_clip(tmp_path / "open_clip", SEED)
    loaded = InfiniteIdPipeline.from_local(
        tmp_path / "sdxl", tmp_path / "adapter", tmp_path / "open_clip", face_analyzer=analyzer
    )
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        run(loaded, id_embeddings=tokens(pipe, 0)), run(pipe, id_embeddings=tokens(pipe, 0))
    )
    black = torch.zeros(1, 3, 224, 224)
    torch.testing.assert_close(loaded.clip_vision(black), pipe.clip_vision(black), rtol=0, atol=0)
