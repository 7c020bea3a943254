"""Settings of the image-quality heads (aesthetic, NSFW, watermark); importable without torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infu.paths import ResolvedPath


class QualityConfig(BaseModel):
    """Which CLIP model and heads score images. ``tiny`` builds seeded random models, ``full`` loads weights.

    ``watermark_backend`` defaults to ``laion`` (the EfficientNet-B3 classifier) for ``full`` and to
    ``text_overlay`` (the model-free detector) for ``tiny``, where a random classifier detects nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["tiny", "full"] = "tiny"
    clip_model: ResolvedPath | None = Field(
        None,
        description="local transformers CLIP folder (production: openai/clip-vit-large-patch14), never "
        "downloaded",
    )
    aesthetic_head: ResolvedPath | None = Field(
        None, description="LAION improved aesthetic predictor state dict (sac+logos+ava1-l14-linearMSE.pth)"
    )
    nsfw_head: ResolvedPath | None = Field(
        None, description="LAION CLIP NSFW head state dict (clip_ViT-L-14_openai_binary_nsfw_head.pth)"
    )
    watermark_backend: Literal["laion", "text_overlay"] = "text_overlay"
    watermark_model: ResolvedPath | None = Field(
        None, description="LAION watermark classifier state dict (watermark_model_v1.pt)"
    )
    tiny_seed: int = Field(0, ge=0, description="seed of the tiny variant's random-init weights")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    batch_size: int = Field(32, ge=1, description="images per forward pass")

    @model_validator(mode="before")
    @classmethod
    def _variant_default_watermark_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") == "full" and "watermark_backend" not in data:
            return {**data, "watermark_backend": "laion"}
        return data

    @model_validator(mode="after")
    def _full_needs_weights(self) -> QualityConfig:
        if self.variant != "full":
            return self
        required = ["clip_model", "aesthetic_head", "nsfw_head"]
        if self.watermark_backend == "laion":
            required.append("watermark_model")
        missing = [key for key in required if getattr(self, key) is None]
        if missing:
            raise ValueError(
                f"variant 'full' loads real weights: set {', '.join(missing)} "
                f"(watermark_backend={self.watermark_backend!r})"
            )
        return self
