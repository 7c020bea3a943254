"""The ``caption:`` config section: which sources caption the filter's kept samples, and how.

Sources, in column order: ``original`` (dataset text), ``attribute`` (a sentence from the face stack and
dataset attributes), ``small`` (a small captioner: GIT or BLIP base), ``blip2`` and ``internvl2`` (VLMs).
Each neural source has its engine, model folder (``variant: full``; never downloaded) or a seeded tiny
random-init model of the same class (``variant: tiny``, the embedded profile), prompt, generation
budget, batch size and dtype.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from infu.config import Resources, Section
from infu.paths import ResolvedPath


class NeuralCaptioner(Section):
    """Settings every neural captioner shares."""

    variant: Literal["tiny", "full"] = Field(
        "tiny", description="tiny: a seeded random-init model of the real class; full: `model` is loaded"
    )
    model: ResolvedPath | None = Field(
        None, description="local model folder (variant full), never downloaded"
    )
    prompt: str | None = Field(None, description="text prompt (null: the engine's default, see the README)")
    max_new_tokens: int = Field(40, ge=1, le=1024)
    batch_size: int = Field(8, ge=1, description="images per generate call")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when the worker has a GPU"
    )
    tiny_seed: int = Field(0, ge=0, description="seed of the tiny variant's random-init weights")
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray runtime environment of this captioner's workers (pip set or image_uri); engines "
        "with pins of their own (lavis, lmdeploy) default to theirs",
    )

    @model_validator(mode="after")
    def _full_needs_model(self) -> NeuralCaptioner:
        if self.variant == "full" and self.model is None:
            raise ValueError("variant 'full' loads real weights: set `model` to a local folder")
        return self


class SmallCaptioner(NeuralCaptioner):
    """A small captioner that runs on CPU in production too (e.g. microsoft/git-base-coco,
    Salesforce/blip-image-captioning-base)."""

    engine: Literal["git", "blip"] = "git"
    max_new_tokens: int = Field(30, ge=1, le=1024)


class Blip2Captioner(NeuralCaptioner):
    """BLIP-2 (e.g. Salesforce/blip2-opt-2.7b) through transformers, or LAVIS (``engine: lavis``)."""

    engine: Literal["transformers", "lavis"] = "transformers"
    lavis_model_type: str = Field(
        "caption_coco_opt2.7b", description="LAVIS blip2_opt model type (engine lavis)"
    )

    @model_validator(mode="after")
    def _lavis_loads_real_weights(self) -> Blip2Captioner:
        _no_tiny_variant(self, "lavis")
        return self


class InternVL2Captioner(NeuralCaptioner):
    """InternVL2 through transformers' InternVL classes (runs anywhere) or lmdeploy (GPU nodes)."""

    engine: Literal["transformers", "lmdeploy"] = "transformers"
    max_new_tokens: int = Field(120, ge=1, le=1024)
    tensor_parallel: int = Field(1, ge=1, description="lmdeploy: GPUs per model replica")
    session_len: int = Field(8192, ge=256, description="lmdeploy: context length of a session")

    @model_validator(mode="after")
    def _lmdeploy_loads_real_weights(self) -> InternVL2Captioner:
        _no_tiny_variant(self, "lmdeploy")
        return self


def _no_tiny_variant(settings: NeuralCaptioner, engine: str) -> None:
    if getattr(settings, "engine", None) == engine and settings.variant == "tiny":
        raise ValueError(f"engine {engine} has no tiny variant: set variant full and a local `model` folder")


class AttributeCaptioner(Section):
    """A short sentence from the face stack and dataset attributes; needs no model."""

    seed: int = Field(0, ge=0, description="picks among equivalent phrasings, per sample key")


class CaptionQuality(Section):
    """Caption checks. Empty captions are always dropped; over-long ones are cut to the T5 budget and
    counted; flags named in ``drop`` null the caption (it is still counted per source)."""

    t5_max_tokens: int = Field(512, ge=1, description="FLUX's T5 budget (max_sequence_length)")
    clip_max_tokens: int = Field(77, ge=1, description="CLIP's budget: longer captions are flagged")
    tokenizers: ResolvedPath | None = Field(
        None,
        description="a FLUX folder with tokenizer/ (CLIP) and tokenizer_2/ (T5) to count tokens; null = "
        "an approximate count (words and punctuation)",
    )
    max_repeated_fraction: float = Field(
        0.5, gt=0, le=1, description="repetition: share of words inside repeated n-grams at or above this"
    )
    drop: list[Literal["repetition", "multiple_people"]] = Field(
        default_factory=lambda: ["repetition", "multiple_people"],
        description="flags that drop the caption (it stays in the stats)",
    )


class CaptionConfig(Section):
    """Filter output (kept samples) -> one captions Parquet per shard, one column per source."""

    input: ResolvedPath | None = Field(None, description="filter output folder; null = this run's")
    original: bool = Field(True, description="keep the dataset's own text as the `original` source")
    attribute: AttributeCaptioner | None = AttributeCaptioner()
    small: SmallCaptioner | None = None
    blip2: Blip2Captioner | None = None
    internvl2: InternVL2Captioner | None = None
    quality: CaptionQuality = CaptionQuality()
    max_side: int = Field(
        768, ge=64, description="images are decoded downscaled to this longer side (captioners resize anyway)"
    )
    max_pixels: int = Field(64 * 1024 * 1024, gt=0)
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _some_source(self) -> CaptionConfig:
        if not self.sources():
            raise ValueError(
                "no caption source is enabled: set original, attribute, small, blip2 or internvl2"
            )
        return self

    def sources(self) -> list[str]:
        """The enabled sources, in column order."""
        enabled = {
            "original": self.original,
            "attribute": self.attribute is not None,
            "small": self.small is not None,
            "blip2": self.blip2 is not None,
            "internvl2": self.internvl2 is not None,
        }
        return [source for source, on in enabled.items() if on]

    def neural(self) -> dict[str, NeuralCaptioner]:
        """The enabled neural captioners by source, in column order."""
        found = {"small": self.small, "blip2": self.blip2, "internvl2": self.internvl2}
        return {source: settings for source, settings in found.items() if settings is not None}
