"""Model settings: the family (InfU on FLUX, Infinite-ID on SDXL), base model, InfuseNet, identity projection,
LoRAs, inference defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infu.face.recognizer import EMBEDDING_DIMS, RELEASE_EMBEDDING_SPACE, EmbeddingSpace
from infu.paths import ResolvedPath

LATENT_PIXEL_MULTIPLE = 16
"""Image sides must be multiples of this: the VAE downsamples 8x and latents are packed in 2x2 patches."""


class ProjectionConfig(BaseModel):
    """Perceiver Resampler turning one identity embedding into ``num_queries`` identity tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(1280, ge=1)
    depth: int = Field(4, ge=1)
    dim_head: int = Field(64, ge=1)
    heads: int = Field(20, ge=1)
    num_queries: int = Field(8, ge=1)
    embedding_dim: int = Field(512, ge=1, description="512 for the ArcFace spaces, 128 for dlib's")
    embedding_space: EmbeddingSpace = Field(
        RELEASE_EMBEDDING_SPACE,
        description="the face.recognizer whose embeddings the projection was trained on; unset: dlib for "
        "128-D embeddings, else the release's arcface_ir_se50",
    )
    output_dim: int = Field(4096, ge=1, description="the InfuseNet's joint_attention_dim (T5 width)")
    ff_mult: int = Field(4, ge=1)

    @staticmethod
    def default_embedding_space(embedding_dim: int | None) -> EmbeddingSpace:
        """The space of a projection that declares none: dlib for 128-D embeddings, else the release's."""
        return "dlib" if embedding_dim == EMBEDDING_DIMS["dlib"] else RELEASE_EMBEDDING_SPACE

    @model_validator(mode="before")
    @classmethod
    def _default_space(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("embedding_space") is None:
            return {**data, "embedding_space": cls.default_embedding_space(data.get("embedding_dim"))}
        return data

    @model_validator(mode="after")
    def _space_fits_embedding_dim(self) -> ProjectionConfig:
        if EMBEDDING_DIMS[self.embedding_space] != self.embedding_dim:
            raise ValueError(
                f"{self.embedding_space} embeddings are {EMBEDDING_DIMS[self.embedding_space]}-D, but "
                f"embedding_dim is {self.embedding_dim}"
            )
        return self


class InferenceConfig(BaseModel):
    """Sampling defaults of the InfU pipeline (every one can be overridden per call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(864, ge=LATENT_PIXEL_MULTIPLE, multiple_of=LATENT_PIXEL_MULTIPLE)
    height: int = Field(1152, ge=LATENT_PIXEL_MULTIPLE, multiple_of=LATENT_PIXEL_MULTIPLE)
    num_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(
        3.5, ge=0, description="base transformer guidance (ignored without guidance embeds)"
    )
    infusenet_guidance_scale: float = Field(1.0, ge=0)
    infusenet_conditioning_scale: float = 1.0
    infusenet_guidance_start: float = Field(0.0, ge=0, le=1, description="fraction of the steps")
    infusenet_guidance_end: float = Field(1.0, ge=0, le=1, description="fraction of the steps")
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 prompt tokens")

    @model_validator(mode="after")
    def _window_in_order(self) -> InferenceConfig:
        if self.infusenet_guidance_start > self.infusenet_guidance_end:
            raise ValueError(
                f"infusenet_guidance_start ({self.infusenet_guidance_start}) must not exceed "
                f"infusenet_guidance_end ({self.infusenet_guidance_end})"
            )
        return self


class LoraConfig(BaseModel):
    """A FLUX LoRA (diffusers/peft or kohya safetensors) applied to the base transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(..., description="file or folder; relative paths are read from infu_model when set")
    scale: float = 1.0
    adapter_name: str | None = Field(None, description="defaults to the file's stem")


TINY_PROJECTION = {
    "dim": 64,
    "depth": 1,
    "dim_head": 16,
    "heads": 4,
    "num_queries": 8,
    "embedding_dim": 128,
    "embedding_space": "dlib",
    "output_dim": 32,
    "ff_mult": 2,
}
"""Tiny variant's projection defaults: 128-D dlib embeddings in, 32-wide tokens (the tiny T5 width) out."""
TINY_INFERENCE = {"width": 96, "height": 128, "num_steps": 4, "max_sequence_length": 32}
"""Tiny variant's inference defaults: a CPU-sized image and schedule."""


class InfiniteIdSwitches(BaseModel):
    """Infinite-ID's inference switches; the paper's inference by default (mixed attention, AdaIN-mean),
    its ablations with ``mode: mutual`` or ``plain``, ``adain: full`` or null."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["plain", "mixed", "mutual"] = "mixed"
    adain: Literal["mean", "full"] | None = "mean"
    identity_scale: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _adain_needs_two_streams(self) -> InfiniteIdSwitches:
        if self.adain is not None and self.mode == "plain":
            raise ValueError("adain aligns the identity stream to the text stream: use mode mixed or mutual")
        return self

    def switches(self) -> dict[str, Any]:
        """``{"mode": ..., "adain": ..., "identity_scale": ...}``."""
        return {name: getattr(self, name) for name in InfiniteIdSwitches.model_fields}


class InfiniteIdSettings(InfiniteIdSwitches):
    """Infinite-ID (``family: infinite_id``): its trained adapter, image tower, face embedding space and
    inference switches."""

    adapter: ResolvedPath | None = Field(
        None, description="InfiniteIdAdapter folder (a training step's export); null: a fresh one (training)"
    )
    open_clip: ResolvedPath | None = Field(
        None, description="OpenCLIP ViT-H/14 folder: open_clip_config.json + weights (full variant)"
    )
    embedding_space: EmbeddingSpace = Field(
        "glintr100",
        description="the face mapper's input: the space of face.recognizer (the release: insightface's)",
    )


class ModelConfig(BaseModel):
    """``variant: tiny`` builds random-init models of the real architectures (CPU, seconds).

    ``variant: full`` loads FLUX from ``base_model``. Either variant loads InfuseNet and projection from
    ``infu_model`` (the released layout) when it is set, and starts them fresh otherwise (training).
    Unset ``projection``/``inference`` keys default to the release's values for ``full`` and to
    :data:`TINY_PROJECTION`/:data:`TINY_INFERENCE` for ``tiny``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["infu", "infinite_id"] = Field(
        "infu", description="infu: InfuseNet on FLUX; infinite_id: Infinite-ID's adapter on SDXL"
    )
    variant: Literal["tiny", "full"] = "tiny"
    base_model: str | None = Field(
        None, description="FLUX.1-dev (family infu) or SDXL (infinite_id) diffusers folder (full variant)"
    )
    infu_model: ResolvedPath | None = Field(None, description="InfU checkpoint root in the released layout")
    infu_version: str = "aes_stage2"
    infusenet_factor: int = Field(4, ge=1, description="i: InfuseNet has 1/i of the base blocks")
    tiny_seed: int = Field(0, description="seed of the tiny variant's random base models")
    projection: ProjectionConfig = ProjectionConfig()
    inference: InferenceConfig = InferenceConfig()
    loras: list[LoraConfig] = Field(default_factory=list)
    fuse_loras: bool = Field(False, description="fuse the LoRAs into the transformer weights once loaded")
    cpu_offload: bool = Field(False, description="diffusers model CPU offload; needs an accelerator")
    quantize: Literal["float8", "int8"] | None = Field(
        None,
        description="8-bit weights (optimum-quanto) for the FLUX transformer and the InfuseNet, as the "
        "release offers; LoRAs must then be fused first (fuse_loras: true)",
    )
    infinite_id: InfiniteIdSettings = InfiniteIdSettings()

    @model_validator(mode="before")
    @classmethod
    def _tiny_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("variant", "tiny") != "tiny":
            return data
        data = dict(data)
        for key, defaults in (("projection", TINY_PROJECTION), ("inference", TINY_INFERENCE)):
            given = data.get(key)
            if given is None or isinstance(given, dict):
                data[key] = {**defaults, **(given or {})}
        return data

    @model_validator(mode="after")
    def _base_model_matches_variant(self) -> ModelConfig:
        if self.variant == "full" and not self.base_model:
            raise ValueError(
                "base_model (a FLUX diffusers folder or hub id) is required when variant is full"
            )
        if self.variant == "tiny" and self.base_model:
            raise ValueError(f"base_model ({self.base_model!r}) is only used by variant full, not tiny")
        return self

    @model_validator(mode="after")
    def _family_settings(self) -> ModelConfig:
        if self.family == "infinite_id":
            unused = [name for name in ("infu_model", "loras", "quantize") if getattr(self, name)]
            if unused:
                raise ValueError(f"{', '.join(unused)}: InfU settings, not used by family infinite_id")
            if self.variant == "full" and self.infinite_id.open_clip is None:
                raise ValueError("family infinite_id, variant full needs infinite_id.open_clip")
        return self

    def infinite_id_sampling(self) -> dict[str, Any]:
        """``InfiniteIdPipeline.__call__`` keywords: ``infinite_id``'s switches and ``inference``'s size,
        steps and guidance."""
        inference = self.inference
        return {
            **self.infinite_id.switches(),
            "width": inference.width,
            "height": inference.height,
            "num_inference_steps": inference.num_steps,
            "guidance_scale": inference.guidance_scale,
        }

    @model_validator(mode="after")
    def _loras_fused_before_quantizing(self) -> ModelConfig:
        if self.quantize and self.loras and not self.fuse_loras:
            raise ValueError(
                f"quantize: {self.quantize} needs fuse_loras: true when loras are set (adapters are not "
                "quantized: they are fused into the weights first)"
            )
        return self
