"""Conditional flow matching for InfU: a rectified-flow path between the target's latents and noise.

x_t = (1 - t) x0 + t e with t in (0, 1) (logit-normal by default, diffusers' SD3/FLUX training density),
and the model regresses the velocity e - x0 (MSE on packed latents). The velocity comes from
:meth:`InfU.forward`: the frozen base with InfuseNet residuals, the code path the pipeline samples with.
The frozen VAE and text encoders are the pipeline's own.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor

from infu.model.infu import InfU
from infu.model.pipeline import InfUFluxPipeline
from training.config import TimestepConfig, TrainConfig


def sample_timesteps(settings: TimestepConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch]`` flow-matching times in (0, 1)."""
    return compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal" if settings.sampling == "logit_normal" else "none",
        batch_size=batch,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        generator=generator,
    )


class FlowMatchingObjective:
    """Encodes a micro batch with the frozen encoders and returns the velocity loss of ``infu``."""

    def __init__(self, pipeline: InfUFluxPipeline, infu: InfU, config: TrainConfig, max_sequence_length: int):
        self.pipeline = pipeline
        self.infu = infu
        self.config = config
        self.max_sequence_length = max_sequence_length
        # diffusers warns of every truncated caption, printing a wrong slice (empty texts); captions are
        # cut at max_sequence_length on purpose, as at inference
        logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)

    @torch.no_grad()
    def packed_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[B, 3, H, W]`` pixels in [-1, 1] -> packed, scaled VAE latents ``[B, H/16 * W/16, 64]``."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return FluxPipeline._pack_latents(latents, *latents.shape)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The model inputs of a micro batch, none of which needs gradients."""
        pipeline = self.pipeline
        device = pipeline.transformer.device
        prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
            prompt=batch["prompts"],
            prompt_2=None,
            device=device,
            max_sequence_length=self.max_sequence_length,
        )
        height, width = batch["pixels"].shape[-2:]
        scale = pipeline.vae_scale_factor * 2
        return {
            "x0": self.packed_latents(batch["pixels"], generator),
            "control_latents": self.packed_latents(batch["control"], generator),
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "text_ids": text_ids,
            "img_ids": FluxPipeline._prepare_latent_image_ids(
                None, height // scale, width // scale, device, prompt_embeds.dtype
            ),
            "id_embedding": batch["id_embedding"].to(device),
        }

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Mean squared error between the predicted and the true velocity ``e - x0``."""
        inputs = self.encode(batch, generator)
        x0 = inputs.pop("x0")
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = sample_timesteps(self.config.timesteps, x0.shape[0], generator).to(x0.device, x0.dtype)
        noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        dtype = self.infu.infusenet.dtype
        predicted = self.infu(
            self.pipeline.transformer,
            latents=noisy.to(dtype),
            timestep=t.to(dtype),
            guidance_scale=self.config.guidance_scale,
            infusenet_guidance_scale=self.config.infusenet_guidance_scale,
            **{
                name: value.to(dtype) if value.is_floating_point() else value
                for name, value in inputs.items()
            },
        )
        return F.mse_loss(predicted.float(), (noise - x0).float())
