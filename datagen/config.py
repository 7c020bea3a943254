"""The ``synth:`` and ``spms:`` config sections: how SPMS pairs are made from the filter's kept portraits
with the stage-1 model, and which of them the SPMS filter keeps. Paper values are in
``configs/flux-dev.yaml``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from datagen.swap.config import SwapConfig
from infu.config import Resources, Section
from infu.model.config import LATENT_PIXEL_MULTIPLE
from infu.paths import ResolvedPath


class SynthLora(Section):
    """One LoRA of a set: a file (diffusers/peft or kohya safetensors), or with ``tiny_seed`` a seeded
    random LoRA of the same format on the tiny base (the embedded profile), written by each worker."""

    path: ResolvedPath | None = None
    tiny_seed: int | None = None
    scale: float = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> SynthLora:
        if (self.path is None) == (self.tiny_seed is None):
            raise ValueError("a LoRA needs exactly one of path (a file) and tiny_seed (the tiny base's)")
        return self


class LoraSet(Section):
    """LoRAs applied together to one generation (aesthetic, enhancement...); sets are drawn by weight."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$")
    loras: list[SynthLora] = Field(default_factory=list, description="empty: the stage-1 model alone")
    weight: float = Field(1.0, gt=0)


class SynthConfig(Section):
    """SPMS synthesis: each kept portrait (the reference) -> ``samples_per_reference`` new images of that
    person from the stage-1 export, with sampled prompts, LoRA sets and pose photos, then face-swapped."""

    samples_per_reference: int = Field(4, ge=1)
    seed: int = Field(0, description="with the reference's key and the sample index, every draw")
    prompt_bank: ResolvedPath | None = Field(None, description="a prompt bank YAML; null: the packaged one")
    lora_sets: list[LoraSet] = Field(default_factory=lambda: [LoraSet(name="none")])
    pose_photos: ResolvedPath | None = Field(
        None, description="folder of photos whose largest face's keypoints become the control image"
    )
    pose_share: float = Field(0.5, ge=0, le=1, description="share of generations with a pose photo")
    photo_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of samples whose target is a pose photo given the reference's face by the swap "
        "instead of a generation (needs pose_photos)",
    )
    width: int | None = Field(None, ge=16, description="generated width (null: the model's inference)")
    height: int | None = Field(None, ge=16, description="generated height (null: the model's inference)")
    num_steps: int | None = Field(None, ge=1, description="denoising steps (null: the model's inference)")
    guidance_scale: float | None = Field(None, ge=0)
    swap: SwapConfig = SwapConfig()
    max_pixels: int = Field(40_000_000, ge=1, description="decoding limit of reference and pose photos")
    resources: Resources = Resources(batch_size=4)

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        for side in (self.width, self.height):
            if side is not None and side % LATENT_PIXEL_MULTIPLE:
                raise ValueError(f"width and height must be multiples of {LATENT_PIXEL_MULTIPLE}, got {side}")
        if self.photo_share > 0 and self.pose_photos is None:
            raise ValueError("photo_share > 0 needs pose_photos (the photos given the reference's face)")
        names = [lora_set.name for lora_set in self.lora_sets]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"lora_sets need at least one set and unique names, got {names}")
        return self


class SpmsThresholds(Section):
    """The SPMS filter's rules, each a recorded reject reason; every score is kept either way."""

    min_identity_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="cosine of reference and synthetic face embeddings; null: the face stack's same-person "
        "cosine (infu.face.SAME_IDENTITY_SIMILARITY: 0.4 for ArcFace, 0.92 for dlib)",
    )
    max_abs_yaw: float = Field(45.0, gt=0)
    max_abs_pitch: float = Field(30.0, gt=0)
    second_face_ratio: float = Field(
        0.2, gt=0, le=1, description="a second face this large (area vs the largest) means not one person"
    )
    min_aesthetic: float | None = Field(None, description="null: no aesthetic rule")
    max_nsfw: float = Field(0.5, ge=0, le=1)
    max_copy_paste: float = Field(
        0.95,
        ge=-1,
        le=1,
        description="correlation of the aligned grey face crops of synthetic and reference above which the "
        "synthetic face is a paste of the reference",
    )


class SpmsConfig(Section):
    """The SPMS filter: synthesis rows -> kept pairs (reference bytes, synthetic bytes, every score)."""

    thresholds: SpmsThresholds = SpmsThresholds()
    input: ResolvedPath | None = Field(None, description="a synth output to read instead of this run's")
    resources: Resources = Resources(batch_size=8)


def pose_photo_files(folder: Path | None) -> list[Path]:
    """The pose photos of a folder, sorted (so draws index them stably)."""
    if folder is None:
        return []
    return sorted(
        path for path in folder.iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
    )
