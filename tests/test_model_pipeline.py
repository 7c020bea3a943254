"""InfU FLUX pipeline on tiny models: identity/control inputs, knobs, batches, LoRAs, base swap, factory."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image, ImageOps

from infu.face import ARCFACE_TEMPLATE, FaceConfig, NoFaceError, draw_keypoints_control, load_face_analyzer
from infu.face.tiny_models import CELL, write_tiny_pack
from infu.model.conditioning import keypoint_control
from infu.model.config import InferenceConfig, LoraConfig, ModelConfig, ProjectionConfig
from infu.model.factory import build_pipeline
from infu.model.infu import InfU
from infu.model.pipeline import InfUFluxPipeline
from infu.model.tiny import tiny_flux_components, tiny_transformer, write_tiny_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

KEYPOINTS = np.array([[20, 24], [44, 24], [32, 36], [22, 46], [42, 46]], dtype=np.float32)
TINY = ModelConfig(
    projection=ProjectionConfig(
        dim=64, depth=1, dim_head=16, heads=4, embedding_dim=128, output_dim=32, ff_mult=2
    ),
    inference=InferenceConfig(width=64, height=64, num_steps=2, max_sequence_length=16),
)


def unit(seed: int, dim: int = 128, rows: int | None = None) -> torch.Tensor:
    shape = (dim,) if rows is None else (rows, dim)
    return torch.nn.functional.normalize(
        torch.randn(shape, generator=torch.Generator().manual_seed(seed)), dim=-1
    )


def trained(pipeline: InfUFluxPipeline) -> InfUFluxPipeline:
    """Make the zero-initialised InfuseNet outputs non-zero, as after training."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in pipeline.infusenet.named_parameters():
            if name.startswith("controlnet_"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pipeline


def run(pipeline: InfUFluxPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("prompt", "a portrait photo")
    if "id_image" not in kwargs:
        kwargs.setdefault("id_embedding", unit(0))
    images = pipeline(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    return np.asarray(images)


@pytest.fixture(scope="module")
def pipe() -> InfUFluxPipeline:
    pipeline = trained(build_pipeline(TINY))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def astronaut() -> str:
    skimage_data = pytest.importorskip("skimage.data")
    return os.path.join(os.path.dirname(skimage_data.__file__), "astronaut.png")


@pytest.fixture(scope="module")
def pose_photo(astronaut, tmp_path_factory) -> str:
    """The astronaut's face, cropped so that dlib still finds it on a 64 x 64 canvas."""
    path = tmp_path_factory.mktemp("pose") / "pose.png"
    Image.open(astronaut).convert("RGB").crop((130, 30, 310, 210)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def analyzer():
    return load_face_analyzer(FaceConfig())


def test_generates_reproducibly_from_a_generator(pipe):
    first = run(pipe)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(run(pipe), first)
    assert not np.array_equal(run(pipe, seed=1), first)
    pil = pipe("a portrait photo", id_embedding=unit(0), generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(pil, Image.Image) and pil.size == (64, 64)


def test_identity_control_and_knobs_change_the_image(pipe):
    base = run(pipe)
    assert not np.array_equal(run(pipe, id_embedding=unit(1)), base)
    assert not np.array_equal(run(pipe, control_keypoints=KEYPOINTS), base)
    assert not np.array_equal(run(pipe, guidance_scale=1.0), base)
    assert not np.array_equal(run(pipe, infusenet_guidance_scale=2.0), base)
    assert not np.array_equal(run(pipe, infusenet_conditioning_scale=0.5), base)
    # Outside the start/end window the InfuseNet is off: the identity no longer matters.
    off = run(pipe, infusenet_conditioning_scale=0.0)
    np.testing.assert_array_equal(run(pipe, infusenet_guidance_start=1.0, infusenet_guidance_end=1.0), off)
    np.testing.assert_array_equal(run(pipe, id_embedding=unit(1), infusenet_conditioning_scale=0.0), off)
    half = run(pipe, infusenet_guidance_end=0.5)
    assert not np.array_equal(half, off) and not np.array_equal(half, base)


def test_control_drawing_given_directly_equals_drawn_keypoints(pipe):
    drawn = run(pipe, control_keypoints=KEYPOINTS)
    np.testing.assert_array_equal(
        run(pipe, control_drawing=draw_keypoints_control((64, 64), KEYPOINTS)), drawn
    )
    with pytest.raises(ValueError, match="at most one"):
        run(pipe, control_keypoints=KEYPOINTS, control_drawing=Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="at most one"):
        run(pipe, control_image=Image.new("RGB", (64, 64)), control_drawing=Image.new("RGB", (64, 64)))


def test_batches_of_prompts_and_identities(pipe):
    prompts = ["a portrait photo", "a man on the moon", "a painting"]
    batch = run(pipe, prompt=prompts)
    assert batch.shape == (3, 64, 64, 3)
    assert not np.array_equal(batch[0], batch[1])
    per_prompt = run(pipe, prompt=prompts, id_embedding=unit(5, rows=3))
    assert per_prompt.shape == (3, 64, 64, 3)
    several = run(pipe, prompt=prompts[:2], num_images_per_prompt=2)
    assert several.shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="2 identity embeddings for 3 prompts"):
        run(pipe, prompt=prompts, id_embedding=unit(5, rows=2))


def test_inputs_are_checked(pipe):
    with pytest.raises(ValueError, match="exactly one of id_image and id_embedding"):
        pipe("a photo", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a face analyzer"):
        run(pipe, id_image=Image.new("RGB", (64, 64)), id_embedding=None)
    with pytest.raises(ValueError, match=r"control_image \(a pose photo\) needs a face analyzer"):
        run(pipe, control_image=Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="multiple of 16"):
        run(pipe, width=72)
    with pytest.raises(ValueError, match="must not exceed"):
        run(pipe, infusenet_guidance_start=0.8, infusenet_guidance_end=0.2)


def test_face_stack_id_images_mixing_and_pose(analyzer, astronaut, pose_photo, tmp_path):
    pipeline = trained(build_pipeline(TINY, face_analyzer=analyzer))
    pipeline.set_progress_bar_config(disable=True)
    face = analyzer.analyze(astronaut)
    embedding = max(face, key=lambda f: f.area).embedding
    from_image = run(pipeline, id_image=astronaut)
    np.testing.assert_array_equal(from_image, run(pipeline, id_embedding=embedding))

    mirrored = ImageOps.mirror(Image.open(astronaut).convert("RGB"))
    mixed = run(pipeline, id_image=[astronaut, mirrored], id_weights=[0.3, 0.7])
    assert not np.array_equal(mixed, from_image)
    with pytest.raises(ValueError, match="non-negative"):
        run(pipeline, id_image=[astronaut, mirrored], id_weights=[1.0, -1.0])

    posed = run(pipeline, id_image=astronaut, control_image=pose_photo)
    assert not np.array_equal(posed, from_image)
    drawing = keypoint_control(analyzer, pose_photo, 64, 64)
    np.testing.assert_array_equal(run(pipeline, id_image=astronaut, control_drawing=drawing), posed)

    blank = tmp_path / "blank.png"
    Image.new("RGB", (128, 128), (120, 130, 140)).save(blank)
    with pytest.raises(NoFaceError, match="blank.png"):
        run(pipeline, id_image=blank)
    with pytest.raises(NoFaceError, match="blank.png"):
        run(pipeline, id_image=astronaut, control_image=blank)


@pytest.fixture(scope="module")
def tiny_insightface(tmp_path_factory):
    """The insightface backend on the tiny pack (with its own recognizer): it finds a white CELL x CELL
    square on a dark surround whose corner sits on a multiple of CELL (at det size 640), with keypoints
    on the ArcFace template."""
    root = write_tiny_pack(tmp_path_factory.mktemp("insightface_root"), "tinypack")
    config = FaceConfig(
        backend="insightface",
        model_root=root,
        pack_name="tinypack",
        providers=["CPUExecutionProvider"],
        recognizer="glintr100",
    )
    return load_face_analyzer(config)


def test_keypoint_control_detects_on_the_padded_canvas(tiny_insightface, tmp_path):
    # a 240 x 200 dark photo with a white 16 x 16 square at (112, 52): too small to be a face there
    photo = np.full((200, 240, 3), 20, np.uint8)
    photo[52:68, 112:128] = 255
    assert tiny_insightface.analyze(photo) == []
    # into 480 x 640: scaled 2x to 480 x 400, pasted at (0, (640 - 400) // 2 = 120), so the square
    # becomes the 32 x 32 face at (224, 104 + 120 = 224); a 480 x 640 canvas is detected at scale 1
    expected_kps = ARCFACE_TEMPLATE / 112 * CELL + (224, 224)
    control = keypoint_control(tiny_insightface, photo, 480, 640)
    np.testing.assert_array_equal(
        np.asarray(control), np.asarray(draw_keypoints_control((480, 640), expected_kps))
    )
    dark = tmp_path / "dark.png"
    Image.fromarray(np.full((200, 240, 3), 20, np.uint8)).save(dark)
    with pytest.raises(NoFaceError, match="dark.png"):
        keypoint_control(tiny_insightface, dark, 480, 640)


def test_analyzer_embedding_size_must_match_the_projection(analyzer):
    with pytest.raises(ValueError, match="128-D embeddings but the projection expects 512-D"):
        config = TINY.model_copy(
            update={"projection": TINY.projection.model_copy(update={"embedding_dim": 512})}
        )
        build_pipeline(config, face_analyzer=analyzer)


def test_lora_loads_scales_fuses_and_unfuses(tmp_path):
    pipeline = trained(build_pipeline(TINY))
    pipeline.set_progress_bar_config(disable=True)
    lora_file = write_tiny_lora(tmp_path, TINY.projection.output_dim, seed=3)
    base = run(pipeline)

    assert pipeline.apply_loras([LoraConfig(path=lora_file, adapter_name="style")]) == ["style"]
    with_lora = run(pipeline)
    assert np.abs(with_lora - base).max() > 1e-3
    pipeline.set_adapters(["style"], adapter_weights=[0.0])
    np.testing.assert_allclose(run(pipeline), base, atol=1e-5)
    pipeline.set_adapters(["style"], adapter_weights=[1.0])

    pipeline.fuse_lora(adapter_names=["style"])
    np.testing.assert_allclose(run(pipeline), with_lora, atol=1e-4)
    pipeline.unfuse_lora()
    np.testing.assert_allclose(run(pipeline), with_lora, atol=1e-4)
    pipeline.unload_lora_weights()
    np.testing.assert_allclose(run(pipeline), base, atol=1e-5)

    config = TINY.model_copy(update={"loras": [LoraConfig(path=lora_file, scale=1.0)], "fuse_loras": True})
    fused = trained(build_pipeline(config))
    fused.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(fused), with_lora, atol=1e-4)


def test_base_swap_to_a_model_without_guidance_embeds():
    """FLUX.1-schnell-like base (no guidance embeddings, 4 steps) under a guidance-embedding InfuseNet."""
    components = tiny_flux_components(TINY.projection.output_dim, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        infu = InfU.from_transformer(components["transformer"], TINY.projection)
        components["transformer"] = tiny_transformer(joint_attention_dim=32, guidance_embeds=False)
    pipeline = trained(
        InfUFluxPipeline(
            **components,
            infusenet=infu.infusenet,
            image_proj=infu.projection,
            inference=TINY.inference.model_copy(update={"num_steps": 4, "guidance_scale": 0.0}),
        )
    )
    pipeline.set_progress_bar_config(disable=True)
    images = run(pipeline)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert pipeline.infusenet.config.guidance_embeds and not pipeline.transformer.config.guidance_embeds


def test_factory_loads_a_saved_checkpoint_and_checks_the_factor(pipe, tmp_path):
    InfU(pipe.image_proj, pipe.infusenet).save_pretrained(tmp_path / "InfiniteYou", "aes_stage2")
    config = TINY.model_copy(update={"infu_model": tmp_path / "InfiniteYou", "cpu_offload": True})
    loaded = build_pipeline(config)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded), run(pipe))
    with pytest.raises(ValueError, match="infusenet_factor 1"):
        build_pipeline(config.model_copy(update={"infusenet_factor": 1}))


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = build_pipeline(TINY), build_pipeline(TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "text_encoder_2", "vae", "image_proj"):
        for a, b in zip(getattr(first, name).parameters(), getattr(second, name).parameters(), strict=True):
            assert torch.equal(a, b)
    other = build_pipeline(TINY.model_copy(update={"tiny_seed": 1}))
    assert not torch.equal(other.transformer.x_embedder.weight, first.transformer.x_embedder.weight)


def test_model_config_validation():
    with pytest.raises(ValueError, match="base_model"):
        ModelConfig(variant="full")
    with pytest.raises(ValueError, match="only used by variant full"):
        ModelConfig(variant="tiny", base_model="black-forest-labs/FLUX.1-dev")
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(unknown=1)
    full = ModelConfig(variant="full", base_model="black-forest-labs/FLUX.1-dev")
    assert (full.projection.embedding_dim, full.projection.output_dim, full.inference.num_steps) == (
        512,
        4096,
        30,
    )
    tiny = ModelConfig()
    assert (tiny.projection.embedding_dim, tiny.projection.output_dim, tiny.inference.width) == (128, 32, 96)
    partial = ModelConfig.model_validate({"projection": {"depth": 2}, "inference": {"num_steps": 1}})
    assert (partial.projection.depth, partial.projection.embedding_dim) == (2, 128)
    assert (partial.inference.num_steps, partial.inference.height) == (1, 128)


def test_default_embedded_config_fits_the_dlib_face_stack(analyzer):
    """InfuConfig() defaults (dlib face backend, tiny model) build a working pipeline."""
    from infu.config import InfuConfig

    config = InfuConfig()
    pipeline = build_pipeline(config.model, face_analyzer=analyzer)
    assert pipeline.image_proj.config.embedding_dim == analyzer.embedding_dim


def test_full_variant_loads_a_flux_folder_and_an_infu_checkpoint(pipe, tmp_path):
    """The full-size code path (FluxPipeline.from_pretrained + InfU.from_pretrained) on tiny weights."""
    FluxPipeline(**tiny_flux_components(TINY.projection.output_dim, TINY.tiny_seed)).save_pretrained(
        tmp_path / "flux"
    )
    InfU(pipe.image_proj, pipe.infusenet).save_pretrained(tmp_path / "InfiniteYou", "sim_stage1")
    config = TINY.model_copy(
        update={
            "variant": "full",
            "base_model": str(tmp_path / "flux"),
            "infu_model": tmp_path / "InfiniteYou",
            "infu_version": "sim_stage1",
        }
    )
    assert build_pipeline(config).transformer.dtype == torch.bfloat16  # the full variant's default
    full = build_pipeline(config, dtype=torch.float32)
    full.set_progress_bar_config(disable=True)
    assert full.infusenet.dtype == full.image_proj.dtype == torch.float32
    np.testing.assert_allclose(run(full), run(pipe), atol=1e-4)
