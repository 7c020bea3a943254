"""Identity projection: a Perceiver Resampler turning one face embedding into identity tokens.

State-dict keys and forward math follow the released ``image_proj`` checkpoint exactly (see
``../shared/specs/infu-checkpoint-format.md``), so released weights load with strict key matching.
The projection declares the embedding space it was trained on (``embedding_space`` in our saved config);
a checkpoint without our config is the release's, trained on ``arcface_ir_se50`` embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file
from torch import nn

from infu.model.config import ProjectionConfig

PROJECTION_SAFETENSORS = "image_proj_model.safetensors"
PROJECTION_BIN = "image_proj_model.bin"
PROJECTION_CONFIG = "image_proj_config.json"
RELEASE_TOP_KEY = "image_proj"


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the input features and themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner_dim = dim_head * heads
        self.dim_head = dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        query = self._split_heads(self.to_q(latents))
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        key, value = self._split_heads(key), self._split_heads(value)
        scale = self.dim_head**-0.25
        weights = (query * scale) @ (key * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ value).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, then a bias-free GELU MLP widening ``mult`` times (IP-Adapter's resampler block)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class IdentityProjection(ModelMixin, ConfigMixin):
    """``[B, embedding_dim]`` L2-normalised face embeddings of ``embedding_space`` -> ``[B, num_queries,
    output_dim]`` tokens."""

    config_name = PROJECTION_CONFIG

    @register_to_config
    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 8,
        embedding_dim: int = 512,
        output_dim: int = 4096,
        ff_mult: int = 4,
        embedding_space: str | None = None,
    ):
        super().__init__()
        if embedding_space is None:
            self.register_to_config(embedding_space=ProjectionConfig.default_embedding_space(embedding_dim))
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    @classmethod
    def from_projection_config(cls, config: ProjectionConfig) -> IdentityProjection:
        return cls(**config.model_dump())

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``embedding``: ``[B, D]`` (or ``[B, 1, D]``), one identity embedding per sample."""
        if embedding.ndim == 2:
            embedding = embedding[:, None]
        if embedding.shape[-1] != self.config.embedding_dim:
            raise ValueError(
                f"identity embeddings are {embedding.shape[-1]}-D but the projection expects "
                f"{self.config.embedding_dim}-D {self.config.embedding_space} embeddings (other recognizer?)"
            )
        latents = self.latents.repeat(embedding.shape[0], 1, 1)
        features = self.proj_in(embedding)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))

    def save_pretrained(self, directory: str | Path, release_compatible: bool = True) -> None:
        """Write ``image_proj_model.safetensors`` (+ the released ``.bin`` form) and the config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: tensor.detach().contiguous().cpu() for key, tensor in self.state_dict().items()}
        save_file(state, directory / PROJECTION_SAFETENSORS, metadata={"format": "pt"})
        if release_compatible:
            torch.save({RELEASE_TOP_KEY: state}, directory / PROJECTION_BIN)
        self.save_config(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        config: ProjectionConfig | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> IdentityProjection:
        """Load from a version folder; hyperparameters: ``config`` > saved config > release defaults.

        ``config.embedding_space`` must be the space the checkpoint declares: its saved config's, or for a
        folder without one (the release) what :class:`ProjectionConfig` assumes for its size.
        """
        directory = Path(directory)
        saved = directory / PROJECTION_CONFIG
        saved_config = json.loads(saved.read_text()) if saved.is_file() else None
        if config is not None:
            check_declared_space(directory, saved_config, config)
            model = cls.from_projection_config(config)
        elif saved_config is not None:
            model = cls.from_config(saved_config)
        else:
            model = cls()
        model.load_state_dict(read_projection_state_dict(directory), strict=True)
        return model.to(torch_dtype) if torch_dtype not in (None, model.dtype) else model


def check_declared_space(directory: Path, saved_config: dict | None, config: ProjectionConfig) -> None:
    """``config`` must expect the embedding space that the checkpoint in ``directory`` declares."""
    if saved_config is None:
        declared = ProjectionConfig.default_embedding_space(config.embedding_dim)
        source = f"a released checkpoint: no {PROJECTION_CONFIG}"
    else:
        declared = saved_config.get("embedding_space") or ProjectionConfig.default_embedding_space(
            saved_config["embedding_dim"]
        )
        source = f"its {PROJECTION_CONFIG}"
    if declared != config.embedding_space:
        raise ValueError(
            f"the projection in {directory} expects {declared} embeddings ({source}), but "
            f"model.projection.embedding_space is {config.embedding_space}"
        )


def read_projection_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The projection weights of a version folder: safetensors if present, else the released ``.bin``."""
    if (directory / PROJECTION_SAFETENSORS).is_file():
        return load_file(directory / PROJECTION_SAFETENSORS)
    if (directory / PROJECTION_BIN).is_file():
        payload = torch.load(directory / PROJECTION_BIN, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or RELEASE_TOP_KEY not in payload:
            raise ValueError(f"{directory / PROJECTION_BIN} has no top-level {RELEASE_TOP_KEY!r} state dict")
        return payload[RELEASE_TOP_KEY]
    raise FileNotFoundError(f"{directory} holds neither {PROJECTION_SAFETENSORS} nor {PROJECTION_BIN}")
