"""The trainable part of InfU: identity projection + InfuseNet, in the released checkpoint layout.

```
<root>/config.json                          {"_diffusers_version": ..., "_infu_flux_version": "1.0"}
<root>/infu_flux_v1.0/<version>/image_proj_model.bin           {"image_proj": state dict} (released form)
<root>/infu_flux_v1.0/<version>/image_proj_model.safetensors   same weights (what we prefer to read)
<root>/infu_flux_v1.0/<version>/image_proj_config.json         projection hyperparameters and the
                                                               embedding_space it expects (ours)
<root>/infu_flux_v1.0/<version>/InfuseNetModel/                diffusers FluxControlNetModel folder
```
``from_pretrained`` also accepts ``<model>/<version>/`` and a version folder itself. A version folder
without our projection config is the release's: its projection expects ``arcface_ir_se50`` embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from infu.model.config import ProjectionConfig
from infu.model.infusenet import InfuseNet, infused_velocity
from infu.model.projection import IdentityProjection

INFU_FLUX_VERSION = "1.0"
INFUSENET_FOLDER = "InfuseNetModel"
ROOT_CONFIG = "config.json"


def resolve_version_dir(path: str | Path, version: str) -> Path:
    """The folder holding ``InfuseNetModel/`` for ``version`` under a checkpoint root (several layouts)."""
    path = Path(path)
    candidates = [path / version]
    root_config = path / ROOT_CONFIG
    if root_config.is_file():
        flux_version = json.loads(root_config.read_text()).get("_infu_flux_version")
        if flux_version is not None:
            candidates.insert(0, path / f"infu_flux_v{flux_version}" / version)
    candidates.append(path)
    for candidate in candidates:
        if (candidate / INFUSENET_FOLDER).is_dir():
            return candidate
    looked = ", ".join(str(candidate / INFUSENET_FOLDER) for candidate in candidates)
    raise FileNotFoundError(f"no InfU checkpoint version {version!r} under {path} (looked for {looked})")


class InfU(nn.Module):
    """Identity projection + InfuseNet; ``forward`` is the training-time velocity prediction."""

    def __init__(self, projection: IdentityProjection, infusenet: InfuseNet):
        super().__init__()
        self.projection = projection
        self.infusenet = infusenet

    @classmethod
    def from_transformer(
        cls, transformer: FluxTransformer2DModel, projection: ProjectionConfig, factor: int = 4
    ) -> InfU:
        """Fresh (stage-1 starting point): InfuseNet copied from the base, random projection."""
        if projection.output_dim != transformer.config.joint_attention_dim:
            raise ValueError(
                f"projection output_dim {projection.output_dim} must equal the transformer's "
                f"joint_attention_dim {transformer.config.joint_attention_dim}"
            )
        infusenet = InfuseNet.from_transformer(transformer, factor=factor)
        return cls(IdentityProjection.from_projection_config(projection), infusenet).to(transformer.dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        version: str = "aes_stage2",
        projection: ProjectionConfig | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> InfU:
        version_dir = resolve_version_dir(path, version)
        infusenet = InfuseNet.from_pretrained(version_dir / INFUSENET_FOLDER, torch_dtype=torch_dtype)
        return cls(IdentityProjection.from_pretrained(version_dir, projection, torch_dtype), infusenet)

    def save_pretrained(
        self, root: str | Path, version: str = "aes_stage2", release_compatible: bool = True
    ) -> Path:
        """Write ``root`` in the released layout; returns the version folder.

        ``release_compatible`` also writes the projection as the released ``image_proj_model.bin``.
        """
        root = Path(root)
        version_dir = root / f"infu_flux_v{INFU_FLUX_VERSION}" / version
        version_dir.mkdir(parents=True, exist_ok=True)
        root_config = {"_diffusers_version": diffusers.__version__, "_infu_flux_version": INFU_FLUX_VERSION}
        (root / ROOT_CONFIG).write_text(json.dumps(root_config, indent=2) + "\n")
        self.projection.save_pretrained(version_dir, release_compatible=release_compatible)
        self.infusenet.save_pretrained(version_dir / INFUSENET_FOLDER, safe_serialization=True)
        return version_dir

    def forward(
        self,
        transformer: FluxTransformer2DModel,
        *,
        id_embedding: torch.Tensor,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        img_ids: torch.Tensor,
        control_latents: torch.Tensor,
        guidance_scale: float = 3.5,
        infusenet_guidance_scale: float = 1.0,
        infusenet_scale: float = 1.0,
    ) -> torch.Tensor:
        """Velocity of the frozen ``transformer`` for packed noisy ``latents`` given ``[B, D]`` embeddings."""
        return infused_velocity(
            transformer,
            self.infusenet,
            latents=latents,
            timestep=timestep,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            text_ids=text_ids,
            img_ids=img_ids,
            id_tokens=self.projection(id_embedding),
            control_latents=control_latents,
            guidance_scale=guidance_scale,
            infusenet_guidance_scale=infusenet_guidance_scale,
            infusenet_scale=infusenet_scale,
        )
