"""The trainable part of Infinite-ID: identity encoder + identity K/V of every cross-attention layer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

from infu.model.infinite_id.attention import (
    attach_identity_processors,
    build_identity_processors,
    identity_layer_dims,
)
from infu.model.infinite_id.mappers import IdentityEncoder, mix_identities

ADAPTER_WEIGHTS = "infinite_id_adapter.safetensors"
ADAPTER_CONFIG = "infinite_id_adapter_config.json"


class InfiniteIdAdapter(ModelMixin, ConfigMixin):
    """:class:`IdentityEncoder` (``encoder``) and one identity ``to_k_id``/``to_v_id`` pair per ``attn2``.

    ``cross_attention_layers`` maps each cross-attention layer's key (see :func:`identity_layer_dims`) to its
    K/V width; ``encoder_config`` holds :class:`IdentityEncoder`'s settings (defaults: SDXL, 16 CLIP + 4
    face tokens).
    """

    config_name = ADAPTER_CONFIG

    @register_to_config
    def __init__(self, cross_attention_layers: dict[str, int], encoder_config: dict | None = None):
        super().__init__()
        self.encoder = IdentityEncoder(**(encoder_config or {}))
        self.register_to_config(
            encoder_config={
                key: value for key, value in self.encoder.config.items() if not key.startswith("_")
            }
        )
        self.identity_kv = build_identity_processors(
            cross_attention_layers, self.encoder.config.cross_attention_dim
        )

    @classmethod
    def for_unet(cls, unet: torch.nn.Module, **encoder: int) -> InfiniteIdAdapter:
        """A fresh adapter sized for ``unet``; identity tokens as wide as its text embeddings by default."""
        encoder = {"cross_attention_dim": unet.config.cross_attention_dim, **encoder}
        return cls(cross_attention_layers=identity_layer_dims(unet), encoder_config=encoder)

    def forward(self, clip_hidden_states: torch.Tensor, arcface_embedding: torch.Tensor) -> torch.Tensor:
        """Identity tokens ``[B, clip_tokens + face_tokens, cross_attention_dim]`` (the encoder's)."""
        return self.encoder(clip_hidden_states, arcface_embedding)

    def attach(self, unet: torch.nn.Module) -> None:
        """Install this adapter's identity processors on ``unet`` (weights shared, not copied).

        Nothing is moved: put the adapter on the UNet's device and dtype first (or run under autocast).
        """
        attach_identity_processors(unet, self.identity_kv)

    mix_identities = staticmethod(mix_identities)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``infinite_id_adapter.safetensors`` and its config into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: tensor.detach().contiguous().cpu() for key, tensor in self.state_dict().items()}
        save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        self.save_config(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, torch_dtype: torch.dtype | None = None
    ) -> InfiniteIdAdapter:
        """Load a folder written by :meth:`save_pretrained`; every key must match exactly."""
        directory = Path(directory)
        model = cls.from_config(json.loads((directory / ADAPTER_CONFIG).read_text()))
        state = load_file(directory / ADAPTER_WEIGHTS)
        expected = model.state_dict().keys()
        missing = sorted(expected - state.keys())
        unexpected = sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{directory / ADAPTER_WEIGHTS} does not match the adapter config: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        model.load_state_dict(state, strict=True)
        return model.to(torch_dtype) if torch_dtype not in (None, model.dtype) else model
