"""Conditional flow matching for InfU: a rectified-flow path between the target's latents and noise.

x_t = (1 - t) x0 + t e with t in (0, 1) (logit-normal by default, diffusers' SD3/FLUX training density),
and the model regresses the velocity e - x0 (MSE on packed latents). The velocity comes from
:meth:`InfU.forward`: the frozen base with InfuseNet residuals, the code path the pipeline samples with.
The frozen VAE and text encoders are the pipeline's own (:class:`FrozenEncoders`); what they give a
sample (its latent distribution, its caption's embeddings) may instead come from the precompute step's
cache, which holds the same values: the seeded draws from them stay the same.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor

from infu.model.config import LATENT_PIXEL_MULTIPLE
from infu.model.infu import InfU
from infu.quality.torch_utils import weights_digest
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


TextEmbeddings = tuple[torch.Tensor, torch.Tensor]
"""A caption's T5 token embeddings ``[L, D]`` and pooled CLIP embedding ``[P]``."""


class FrozenEncoders:
    """The frozen VAE and text encoders of a ``FluxPipeline``: a sample's latent distribution (its mean
    and log-variance, ``[2C, h, w]``) and a caption's embeddings, and the identities of both encoders
    (their weights, dtype and text length), which key the precompute step's cache."""

    def __init__(self, pipeline: FluxPipeline, max_sequence_length: int):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self._black: dict[tuple[int, ...], torch.Tensor] = {}
        # diffusers warns of every truncated caption, printing a wrong slice (empty texts); captions are
        # cut at max_sequence_length on purpose, as at inference
        logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)

    @functools.cached_property
    def latent_encoder(self) -> str:
        return weights_digest(self.pipeline.vae)[:16]

    @functools.cached_property
    def text_encoder(self) -> str:
        pipeline = self.pipeline
        weights = weights_digest(pipeline.text_encoder, pipeline.text_encoder_2)
        return hashlib.sha256(f"{weights}:{self.max_sequence_length}".encode()).hexdigest()[:16]

    @torch.no_grad()
    def latent_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` pixels in [-1, 1] -> ``[B, 2C, H/8, W/8]`` latent distribution parameters."""
        vae = self.pipeline.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters

    def black_parameters(self, height: int, width: int) -> torch.Tensor:
        """The latent distribution of a black control image (control dropout), once per size."""
        if (height, width) not in self._black:
            black = -torch.ones(1, 3, height, width)
            self._black[(height, width)] = self.latent_parameters(black)[0]
        return self._black[(height, width)]

    def packed_latents(self, parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A seeded draw from the latent distributions, scaled and packed: ``[B, h/2 * w/2, 64]``."""
        config = self.pipeline.vae.config
        latents = DiagonalGaussianDistribution(parameters).sample(generator)
        latents = (latents - config.shift_factor) * config.scaling_factor
        return FluxPipeline._pack_latents(latents, *latents.shape)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> list[TextEmbeddings]:
        """Each caption's embeddings."""
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.pipeline.vae.device,
            max_sequence_length=self.max_sequence_length,
        )
        return list(zip(embeds, pooled, strict=True))


class FlowMatchingObjective:
    """Encodes a micro batch with the frozen encoders (or takes its cached encodings) and returns the
    velocity loss of ``infu``."""

    pixels_per_token = LATENT_PIXEL_MULTIPLE
    """Image pixels per packed latent token along a side (8x VAE, 2x2 patches)."""

    def __init__(self, pipeline: Any, infu: InfU, config: TrainConfig, max_sequence_length: int):
        self.pipeline = pipeline
        self.infu = infu
        self.config = config
        self.encoders = FrozenEncoders(pipeline, max_sequence_length)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The model inputs of a micro batch, none of which needs gradients. A batch holds ``pixels`` and
        ``control`` images, or (cached) ``latent_parameters`` and ``control_parameters`` (None: black);
        ``text`` may hold a sample's cached caption embeddings (None: encoded here)."""
        encoders = self.encoders
        device = self.pipeline.transformer.device
        if "latent_parameters" in batch:
            target = batch["latent_parameters"]
            scale = self.pipeline.vae_scale_factor
            height, width = (side * scale for side in target.shape[-2:])
            control = torch.stack(
                [
                    cached if cached is not None else encoders.black_parameters(height, width)
                    for cached in batch["control_parameters"]
                ]
            )
        else:
            target = encoders.latent_parameters(batch["pixels"])
            control = encoders.latent_parameters(batch["control"])
        cached_text = batch.get("text") or [None] * len(batch["prompts"])
        missing = [index for index, text in enumerate(cached_text) if text is None]
        encoded = iter(encoders.text([batch["prompts"][index] for index in missing]) if missing else [])
        texts = [text if text is not None else next(encoded) for text in cached_text]
        prompt_embeds = torch.stack([embeds for embeds, _ in texts]).to(device)
        height, width = target.shape[-2:]
        return {
            "x0": encoders.packed_latents(target.to(device), generator),
            "control_latents": encoders.packed_latents(control.to(device), generator),
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": torch.stack([pooled for _, pooled in texts]).to(device),
            "text_ids": torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=prompt_embeds.dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(
                None, height // 2, width // 2, device, prompt_embeds.dtype
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
