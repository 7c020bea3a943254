"""Infinite-ID's face-embedding mappers: CLIP Mapper, Face Mapper and the identity encoder holding both.

The paper names the two mappers but not their layers, so both follow IP-Adapter designs: the CLIP Mapper
is IP-Adapter-Plus's Perceiver Resampler (learned queries attending to the ViT-H/14 hidden states), the
Face Mapper is IP-Adapter-FaceID's MLP (ArcFace vector -> ``num_tokens`` tokens, LayerNorm per token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from infu.model.mixing import normalise_weights
from infu.model.projection import PerceiverAttention, feed_forward


class ClipMapper(ModelMixin, ConfigMixin):
    """``[B, 257, clip_dim]`` ViT-H/14 last hidden states -> ``[B, num_tokens, cross_attention_dim]``."""

    @register_to_config
    def __init__(
        self,
        clip_dim: int = 1280,
        cross_attention_dim: int = 2048,
        num_tokens: int = 16,
        width: int = 1280,
        depth: int = 4,
        heads: int = 20,
        head_dim: int = 64,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, width) / width**0.5)
        self.proj_in = nn.Linear(clip_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, head_dim, heads), feed_forward(width, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)

    def forward(self, clip_hidden_states: torch.Tensor) -> torch.Tensor:
        if clip_hidden_states.ndim != 3 or clip_hidden_states.shape[-1] != self.config.clip_dim:
            raise ValueError(
                f"CLIP hidden states must be [B, tokens, {self.config.clip_dim}], "
                f"got {tuple(clip_hidden_states.shape)}"
            )
        features = self.proj_in(clip_hidden_states)
        latents = self.latents.expand(clip_hidden_states.shape[0], -1, -1)
        for attention, mlp in self.layers:
            latents = attention(features, latents) + latents
            latents = mlp(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceMapper(ModelMixin, ConfigMixin):
    """``[B, arcface_dim]`` ArcFace embeddings -> ``[B, num_tokens, cross_attention_dim]``."""

    @register_to_config
    def __init__(self, arcface_dim: int = 512, cross_attention_dim: int = 2048, num_tokens: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(arcface_dim, arcface_dim * 2),
            nn.GELU(),
            nn.Linear(arcface_dim * 2, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, arcface_embedding: torch.Tensor) -> torch.Tensor:
        if arcface_embedding.ndim != 2 or arcface_embedding.shape[-1] != self.config.arcface_dim:
            raise ValueError(
                f"ArcFace embeddings must be [B, {self.config.arcface_dim}], "
                f"got {tuple(arcface_embedding.shape)}"
            )
        tokens = self.mlp(arcface_embedding)
        tokens = tokens.view(arcface_embedding.shape[0], self.config.num_tokens, -1)
        return self.norm(tokens)


class IdentityEncoder(ModelMixin, ConfigMixin):
    """Both mappers; the identity embedding is ``[CLIP tokens, face tokens]`` along the token axis."""

    @register_to_config
    def __init__(
        self,
        clip_dim: int = 1280,
        arcface_dim: int = 512,
        cross_attention_dim: int = 2048,
        clip_tokens: int = 16,
        face_tokens: int = 4,
        clip_width: int = 1280,
        clip_depth: int = 4,
        clip_heads: int = 20,
        clip_head_dim: int = 64,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.clip_mapper = ClipMapper(
            clip_dim=clip_dim,
            cross_attention_dim=cross_attention_dim,
            num_tokens=clip_tokens,
            width=clip_width,
            depth=clip_depth,
            heads=clip_heads,
            head_dim=clip_head_dim,
            ff_mult=ff_mult,
        )
        self.face_mapper = FaceMapper(
            arcface_dim=arcface_dim, cross_attention_dim=cross_attention_dim, num_tokens=face_tokens
        )

    @property
    def num_tokens(self) -> int:
        return self.config.clip_tokens + self.config.face_tokens

    def forward(self, clip_hidden_states: torch.Tensor, arcface_embedding: torch.Tensor) -> torch.Tensor:
        """-> ``[B, clip_tokens + face_tokens, cross_attention_dim]`` identity tokens."""
        clip_tokens = self.clip_mapper(clip_hidden_states)
        face_tokens = self.face_mapper(arcface_embedding)
        return torch.cat([clip_tokens, face_tokens], dim=1)


def mix_identities(
    tokens_list: Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Identity mixing: ``sum_i w_i * tokens_i`` with weights (default equal) rescaled to sum to 1."""
    weights = normalise_weights(weights, len(tokens_list))
    shapes = {tuple(tokens.shape) for tokens in tokens_list}
    if len(shapes) != 1:
        raise ValueError(f"identity embeddings to mix differ in shape: {sorted(shapes)}")
    return sum(weight * tokens for weight, tokens in zip(weights, tokens_list, strict=True))
