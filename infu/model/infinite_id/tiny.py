"""Tiny random-init versions of every Infinite-ID part (CPU, seconds), with locally built tokenizers.

Same classes and wiring as SDXL and OpenCLIP ViT-H/14: an SDXL UNet (``text_time`` added conditions, cross
attention over both text encoders' hidden states concatenated), a VAE with 4 latent channels and 8x
downsampling, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``, the DDIM schedule Infinite-ID samples
with, and an OpenCLIP ``VisionTransformer`` built from the ViT-H-14 config with small widths (224 px,
patch 14: 257 tokens as in the real tower).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from infu.model.infinite_id.adapter import InfiniteIdAdapter
from infu.model.tiny import CLIP_MAX_LENGTH, tiny_autoencoder, tiny_clip, tiny_clip_tokenizer

SDXL_DDIM_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
"""SDXL's noise schedule with DDIM sampling, as Infinite-ID runs it (the real pipeline uses it too)."""

SDXL_TIME_IDS = 6
"""SDXL's micro-conditions: original size, crop top-left and target size, two numbers each."""
TINY_TIME_EMBED_DIM = 8
TINY_TEXT_2_WIDTH = 64
OPEN_CLIP_ARCHITECTURE = "ViT-H-14"


def tiny_text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder (OpenCLIP bigG in the real model): hidden states and a pooled projection."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_2_WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=TINY_TEXT_2_WIDTH,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_sdxl_unet(cross_attention_dim: int, pooled_text_dim: int) -> UNet2DConditionModel:
    """SDXL's UNet layout (no attention in the first block, linear projections, ``text_time`` conditions),
    8 or 16 dims per head; ``cross_attention_dim`` is both text encoders' widths summed."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * TINY_TIME_EMBED_DIM + pooled_text_dim,
    )


def tiny_sdxl_vae() -> AutoencoderKL:
    """SDXL-like VAE: 4 latent channels, 8x downsampling, SDXL's scaling factor."""
    return tiny_autoencoder(4, scaling_factor=0.13025, force_upcast=True)


def sdxl_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SDXL_DDIM_SCHEDULER)


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The ``StableDiffusionXLPipeline`` components, deterministic in ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_clip_tokenizer()
        text_encoder = tiny_clip(tokenizer)
        text_encoder_2 = tiny_text_encoder_2(tokenizer_2)
        unet = tiny_sdxl_unet(
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            pooled_text_dim=text_encoder_2.config.projection_dim,
        )
        return {
            "vae": tiny_sdxl_vae(),
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
            "unet": unet,
            "scheduler": sdxl_ddim_scheduler(),
        }


def tiny_open_clip_config() -> dict[str, Any]:
    """OpenCLIP's ViT-H-14 model config with 2 vision layers of width 32 (2 heads of 16) and a 1-layer text
    tower (unused by Infinite-ID, but part of an OpenCLIP model folder)."""
    config = open_clip.get_model_config(OPEN_CLIP_ARCHITECTURE)
    return {
        **config,
        "embed_dim": 16,
        "vision_cfg": {**config["vision_cfg"], "layers": 2, "width": 32, "head_width": 16},
        "text_cfg": {**config["text_cfg"], "vocab_size": 512, "width": 16, "heads": 1, "layers": 1},
    }


def tiny_open_clip(seed: int = 0) -> open_clip.CLIP:
    """The whole tiny OpenCLIP model (:func:`tiny_open_clip_config`), random init, seeded."""
    config = tiny_open_clip_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(
            OPEN_CLIP_ARCHITECTURE,
            load_weights=False,
            embed_dim=config["embed_dim"],
            vision_cfg=config["vision_cfg"],
            text_cfg=config["text_cfg"],
        )


def tiny_open_clip_vision(seed: int = 0) -> VisionTransformer:
    """The tiny OpenCLIP image tower: 224 px, patch 14, 1 + 256 tokens of width 32."""
    return tiny_open_clip(seed).visual.eval()


def write_tiny_open_clip(directory: str | Path, seed: int = 0) -> Path:
    """The tiny OpenCLIP model as an OpenCLIP model folder (``open_clip_config.json`` and
    ``open_clip_model.safetensors``, the layout of the real ViT-H/14 release); returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.contiguous() for key, tensor in tiny_open_clip(seed).state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config()}))
    return directory


def tiny_adapter(
    unet: UNet2DConditionModel, clip_dim: int, arcface_dim: int, seed: int = 0
) -> InfiniteIdAdapter:
    """An :class:`InfiniteIdAdapter` for ``unet`` with a 1-layer CLIP mapper (4 tokens) and 2 face tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InfiniteIdAdapter.for_unet(
            unet,
            clip_dim=clip_dim,
            arcface_dim=arcface_dim,
            clip_tokens=4,
            face_tokens=2,
            clip_width=32,
            clip_depth=1,
            clip_heads=2,
            clip_head_dim=16,
            ff_mult=2,
        )
