"""InfuseNet: a reduced FLUX ControlNet branch that injects identity into the frozen base transformer.

Its text stream is the projected identity tokens (all-zero position ids), not the T5 prompt, and its
hint is the packed VAE latent of the control image. Every InfuseNet block's residual is added to the
outputs of a group of consecutive base blocks: with ``n`` base and ``m`` InfuseNet blocks, base block
``k`` receives residual ``k // ceil(n / m)`` (diffusers' interval rule).
"""

from __future__ import annotations

import json
import math

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from diffusers.configuration_utils import FrozenDict

RELEASE_CLASS_NAME = "FluxControlNetModel"


def infusenet_block_counts(num_layers: int, num_single_layers: int, factor: int) -> tuple[int, int]:
    """Double/single block counts for multiplication factor ``factor`` (i=4 on FLUX: 19/38 -> 4/10)."""
    if factor < 1:
        raise ValueError(f"the InfuseNet factor must be >= 1, got {factor}")
    return max(1, num_layers // factor), max(1, math.ceil(num_single_layers / factor))


def residual_groups(num_base_blocks: int, num_residuals: int) -> list[int]:
    """For each base block, the index of the InfuseNet residual added to its output."""
    interval = math.ceil(num_base_blocks / num_residuals)
    return [block // interval for block in range(num_base_blocks)]


class InfuseNet(FluxControlNetModel):
    """A ``FluxControlNetModel`` driven by identity tokens; saved as a plain ``FluxControlNetModel``."""

    @classmethod
    def from_transformer(
        cls,
        transformer: FluxTransformer2DModel,
        factor: int = 4,
        load_weights_from_transformer: bool = True,
    ) -> InfuseNet:
        """An InfuseNet with 1/``factor`` of the base blocks, embedders and blocks copied from the base.

        The output projections (``controlnet_blocks``, ``controlnet_single_blocks``,
        ``controlnet_x_embedder``) start at zero, so a fresh InfuseNet leaves the base output unchanged.
        """
        base = transformer.config
        num_layers, num_single_layers = infusenet_block_counts(
            base.num_layers, base.num_single_layers, factor
        )
        infusenet = cls(
            patch_size=base.patch_size,
            in_channels=base.in_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=base.attention_head_dim,
            num_attention_heads=base.num_attention_heads,
            joint_attention_dim=base.joint_attention_dim,
            pooled_projection_dim=base.pooled_projection_dim,
            guidance_embeds=base.guidance_embeds,
            axes_dims_rope=list(base.axes_dims_rope),
        )
        if load_weights_from_transformer:
            for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"):
                getattr(infusenet, name).load_state_dict(getattr(transformer, name).state_dict())
            for name in ("transformer_blocks", "single_transformer_blocks"):
                blocks = getattr(infusenet, name)
                source = getattr(transformer, name)
                for index, block in enumerate(blocks):
                    block.load_state_dict(source[index].state_dict())
        return infusenet

    def to_json_string(self) -> str:
        """The config as released checkpoints store it (``_class_name: FluxControlNetModel``)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = RELEASE_CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def identity_residuals(
        self,
        *,
        latents: torch.Tensor,
        control_latents: torch.Tensor,
        id_tokens: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        conditioning_scale: float,
        joint_attention_kwargs: dict | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residuals for the base double and single blocks, already multiplied by ``conditioning_scale``."""
        txt_ids = torch.zeros(id_tokens.shape[1], 3, device=id_tokens.device, dtype=img_ids.dtype)
        return self(
            hidden_states=latents,
            controlnet_cond=control_latents,
            conditioning_scale=conditioning_scale,
            encoder_hidden_states=id_tokens,
            pooled_projections=pooled_prompt_embeds,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=False,
        )


def check_compatible(transformer: FluxTransformer2DModel, infusenet: FluxControlNetModel) -> None:
    """Raise if the InfuseNet's widths differ from the base's or some of its residuals would go unused."""
    base, branch = transformer.config, infusenet.config
    for key in (
        "in_channels",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
    ):
        if base[key] != branch[key]:
            raise ValueError(
                f"InfuseNet {key}={branch[key]} does not match the base transformer's {base[key]}"
            )
    for kind, num_base, num_branch in (
        ("double", base.num_layers, branch.num_layers),
        ("single", base.num_single_layers, branch.num_single_layers),
    ):
        if num_branch > num_base or residual_groups(num_base, num_branch)[-1] != num_branch - 1:
            raise ValueError(
                f"{num_branch} InfuseNet {kind} blocks cannot be spread over {num_base} base {kind} blocks"
            )


def _guidance(config: FrozenDict, scale: float, batch: int, device: torch.device) -> torch.Tensor | None:
    if not config.guidance_embeds:
        return None
    return torch.full((batch,), scale, device=device, dtype=torch.float32)


def infused_velocity(
    transformer: FluxTransformer2DModel,
    infusenet: InfuseNet,
    *,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    id_tokens: torch.Tensor,
    control_latents: torch.Tensor,
    guidance_scale: float = 3.5,
    infusenet_guidance_scale: float = 1.0,
    infusenet_scale: float = 1.0,
    joint_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """One flow-matching prediction of the base transformer with InfuseNet residuals.

    ``latents`` and ``control_latents`` are packed ``[B, L, C]``; ``timestep`` is the sigma in [0, 1]
    per sample. With ``infusenet_scale == 0`` the InfuseNet is skipped (the plain base prediction).
    Guidance embeddings are fed to each model only if its config has them (FLUX.1-schnell has none).
    """
    batch, device = latents.shape[0], latents.device
    double = single = None
    if infusenet_scale != 0:
        double, single = infusenet.identity_residuals(
            latents=latents,
            control_latents=control_latents,
            id_tokens=id_tokens,
            pooled_prompt_embeds=pooled_prompt_embeds,
            timestep=timestep,
            img_ids=img_ids,
            guidance=_guidance(infusenet.config, infusenet_guidance_scale, batch, device),
            conditioning_scale=infusenet_scale,
            joint_attention_kwargs=joint_attention_kwargs,
        )
    return transformer(
        hidden_states=latents,
        timestep=timestep,
        guidance=_guidance(transformer.config, guidance_scale, batch, device),
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        controlnet_block_samples=double,
        controlnet_single_block_samples=single,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0]
