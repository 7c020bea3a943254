"""Tiny random-init versions of every FLUX part, with locally built tokenizers (CPU, seconds).

Same classes and wiring as the real models: FLUX transformer (64 packed input channels), a VAE with
16 latent channels and 8x downsampling, a CLIP text model whose pooled output feeds the transformer,
a T5 encoder whose width is the transformer's ``joint_attention_dim``, FLUX.1-dev's scheduler config.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

TINY_HEADS = 2
TINY_HEAD_DIM = 16
TINY_AXES_DIMS_ROPE = (4, 6, 6)
TINY_CLIP_WIDTH = 32
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def tiny_transformer(
    num_layers: int = 2,
    num_single_layers: int = 4,
    joint_attention_dim: int = 32,
    guidance_embeds: bool = True,
) -> FluxTransformer2DModel:
    """A FLUX transformer with the real block structure and 2 heads x 16 dims."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=TINY_CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=TINY_AXES_DIMS_ROPE,
    )


def tiny_autoencoder(latent_channels: int, **options: Any) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` with 8x downsampling (4 blocks) and ``latent_channels``; ``options`` are the
    family's own (scaling factor...)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **options,
    )


def tiny_vae() -> AutoencoderKL:
    """FLUX-like VAE: 16 latent channels, 8x downsampling, FLUX's scaling/shift factors."""
    return tiny_autoencoder(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE without merges: every byte (with and without the end-of-word mark) is a token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def tiny_clip(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_CLIP_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=TINY_CLIP_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """Unigram over single characters and word-initial characters (SentencePiece's ``▁``)."""
    symbols = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(symbol, -3.0) for symbol in symbols] + [("▁" + symbol, -3.5) for symbol in symbols]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5(tokenizer: T5TokenizerFast, width: int) -> T5EncoderModel:
    """A T5 v1.1-style (gated GELU) encoder of ``width`` = the transformer's ``joint_attention_dim``."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's flow-matching scheduler (dynamic, resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def tiny_flux_components(joint_attention_dim: int, seed: int = 0) -> dict[str, Any]:
    """The ``FluxPipeline`` components, deterministic in ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_t5_tokenizer()
        return {
            "scheduler": flux_scheduler(),
            "vae": tiny_vae(),
            "text_encoder": tiny_clip(tokenizer),
            "tokenizer": tokenizer,
            "text_encoder_2": tiny_t5(tokenizer_2, joint_attention_dim),
            "tokenizer_2": tokenizer_2,
            "transformer": tiny_transformer(joint_attention_dim=joint_attention_dim),
        }


def write_tiny_lora(directory: Path, joint_attention_dim: int, seed: int, rank: int = 4) -> Path:
    """A seeded random LoRA (attention q/k/v) of the tiny transformer, saved in the diffusers/peft format
    as ``tiny_lora_<seed>.safetensors`` in ``directory``; returns its path."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = tiny_transformer(joint_attention_dim=joint_attention_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(
            PeftLoraConfig(
                r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
            )
        )
    name = f"tiny_lora_{seed}.safetensors"
    FluxPipeline.save_lora_weights(
        directory, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=name
    )
    return Path(directory) / name
