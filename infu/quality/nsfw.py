"""LAION's CLIP-based NSFW detector (ViT-L/14 head) in torch.

LAION-AI/CLIP-based-NSFW-Detector trained an AutoKeras MLP on L2-normalised OpenAI CLIP ViT-L/14 image
embeddings and ships a torch port (``models/clip_ViT-L-14_openai_binary_nsfw_head.pth``, see its
``src/models.py`` and ``convert_heads_to_pytorch.py``): a Keras ``Normalization`` layer (``norm.mean``,
``norm.variance``), then ``768 -> 64 -> 512 -> 256 -> 1`` with ReLU and a sigmoid; 1 = NSFW. This class
keeps those key names so that file loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from infu.quality.torch_utils import apply_head, load_strict, read_state_dict, seeded

LAION_NSFW_DIM = 768
KERAS_EPSILON = 1e-7
"""Keras' ``Normalization`` divides by ``max(sqrt(variance), epsilon)``."""


class FeatureNormalization(nn.Module):
    """Keras ``Normalization``: ``(x - mean) / max(sqrt(variance), eps)`` with stored statistics."""

    mean: torch.Tensor
    variance: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.variance.sqrt().clamp_min(KERAS_EPSILON)


class NsfwHead(nn.Module):
    """``norm -> input_dim -> 64 -> 512 -> 256 -> 1`` (ReLU between, sigmoid out): P(NSFW) per embedding."""

    def __init__(self, input_dim: int = LAION_NSFW_DIM) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.norm = FeatureNormalization(input_dim)
        self.linear_1 = nn.Linear(input_dim, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)
        self.eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, input_dim]`` L2-normalised embeddings -> ``[B]`` probabilities in [0, 1]."""
        hidden = self.norm(embeddings)
        for layer in (self.linear_1, self.linear_2, self.linear_3):
            hidden = torch.relu(layer(hidden))
        return torch.sigmoid(self.linear_4(hidden)).squeeze(-1)

    @classmethod
    def from_checkpoint(cls, path: Path) -> NsfwHead:
        """Load a state dict (torch file or ``.safetensors``) strictly; input size from ``norm.mean``."""
        state = read_state_dict(path)
        mean = state.get("norm.mean")
        head = cls(LAION_NSFW_DIM if mean is None else int(mean.shape[-1]))
        load_strict(head, state, path)
        return head.eval()

    @classmethod
    def tiny(cls, input_dim: int, seed: int = 0) -> NsfwHead:
        """Random-init head of the same architecture (seeded, global RNG untouched; identity norm)."""
        with seeded(seed):
            return cls(input_dim)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """``[B, input_dim]`` L2-normalised embeddings -> ``[B]`` float32 NSFW probabilities."""
        return apply_head(self, embeddings)
