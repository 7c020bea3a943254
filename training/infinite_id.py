"""Infinite-ID's identity-enhanced training (``model.family: infinite_id``) on a frozen SDXL.

Only the adapter trains: the identity encoder (CLIP Mapper + Face Mapper) and the identity K/V beside
each of the UNet's cross-attention layers. There is no text: the cross-attention runs with
``text_scale=0``, so the text branch is skipped and the frozen text K/V get no signal, the pooled text
condition is zero (SDXL's empty prompt), and a sample's identity comes from another photo of its
identity cluster (``data.reference: same_identity``): its ArcFace embedding, and the OpenCLIP hidden
states of its aligned face crop. The objective is SDXL's: DDPM noise prediction on the VAE latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from infu.model.infinite_id import InfiniteIdAdapter, InfiniteIdPipeline
from infu.runner import run_reduce
from training.config import TrainConfig
from training.objective import sample_timesteps
from training.parallelize import mixed_precision

ADAPTER_PREFIX = "adapter."


class IdentityEnhancedUNet(nn.Module):
    """The trainable adapter driving a frozen SDXL UNet, with the text cross-attention off.

    The UNet is held outside the module tree, so sharding, optimiser and checkpoints see the adapter
    only (its identity processors are installed on the UNet and share their weights)."""

    def __init__(self, adapter: InfiniteIdAdapter, unet: nn.Module):
        super().__init__()
        self.adapter = adapter
        self._frozen = (unet,)

    @property
    def unet(self) -> nn.Module:
        return self._frozen[0]

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        clip_hidden_states: torch.Tensor,
        arcface_embedding: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Predicted noise ``[B, 4, h, w]``: identity cross-attention only."""
        identity = self.adapter(clip_hidden_states, arcface_embedding)
        unused_text = noisy.new_zeros(noisy.shape[0], 1, self.unet.config.cross_attention_dim)
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=unused_text,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            cross_attention_kwargs={"identity": identity, "text_scale": 0.0, "mode": "plain"},
        ).sample


def parallelize_adapter(
    model: IdentityEnhancedUNet,
    *,
    fsdp: bool,
    activation_checkpointing: bool,
    param_dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Freeze the UNet, train the adapter; shard the adapter (FSDP2, one unit) when ``fsdp``."""
    model.unet.requires_grad_(False)  # first: the identity processors are UNet submodules too
    model.adapter.requires_grad_(True)
    if activation_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if fsdp:
        fully_shard(model, mp_policy=mixed_precision(param_dtype, device))


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """The adapter's full weights in place for a call that bypasses its ``forward`` (the pipeline's UNet
    calls its processors directly); a no-op when it is not sharded."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class NoisePredictionObjective:
    """SDXL's objective: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e on the scaled VAE latents (SDXL's
    ``scaled_linear`` betas, 1000 steps), t = floor(u x 1000) with u drawn as ``timesteps`` says (uniform:
    DDPM's), and the MSE between the predicted and the true noise."""

    pixels_per_token = 8
    """Image pixels per latent position along a side (the VAE's downsampling)."""

    def __init__(self, pipeline: InfiniteIdPipeline, model: IdentityEnhancedUNet, settings: TrainConfig):
        self.pipeline = pipeline
        self.model = model
        self.settings = settings
        self.noise_schedule = DDPMScheduler.from_config(pipeline.scheduler.config)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The frozen encoders' part of a micro batch: a seeded draw of the target's latents, the
        reference faces' OpenCLIP hidden states, the zero pooled text and SDXL's size conditions (the
        bucket, uncropped)."""
        vae, unet = self.pipeline.vae, self.model.unet
        pixels = batch["pixels"].to(vae.device, vae.dtype)
        x0 = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        count = x0.shape[0]
        width, height = batch["size"]
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=x0.device, dtype=unet.dtype)
        return {
            "x0": x0.to(unet.dtype),
            "clip_hidden_states": self.pipeline.clip_vision(batch["reference_face"]),
            "arcface_embedding": batch["id_embedding"].to(x0.device),
            "text_embeds": x0.new_zeros(count, self.pipeline.text_encoder_2.config.projection_dim),
            "time_ids": time_ids.expand(count, -1),
        }

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        inputs = self.encode(batch, generator)
        x0 = inputs.pop("x0")
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        steps = self.noise_schedule.config.num_train_timesteps
        u = sample_timesteps(self.settings.timesteps, x0.shape[0], generator)
        timesteps = (u * steps).long().clamp(max=steps - 1).to(x0.device)
        noisy = self.noise_schedule.add_noise(x0, noise, timesteps)
        predicted = self.model(noisy, timesteps, **inputs)
        return F.mse_loss(predicted.float(), noise.float())


def export_adapter(model: IdentityEnhancedUNet, root: Path, rank: int, identity: str) -> None:
    """Gather the adapter's full weights (a collective call) and, on rank 0, write ``root`` as
    :meth:`InfiniteIdAdapter.save_pretrained` does, as a reduce output (:func:`infu.runner.run_reduce`)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return

    def build(folder: Path) -> dict[str, str]:
        adapter = InfiniteIdAdapter.from_config(model.adapter.config)
        adapter.load_state_dict({key.removeprefix(ADAPTER_PREFIX): value for key, value in full.items()})
        adapter.save_pretrained(folder)
        return {"family": "infinite_id"}

    run_reduce(Path(root), identity, build)
