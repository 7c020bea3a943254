"""LAION's "improved aesthetic predictor": a linear MLP on the L2-normalised CLIP image embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from infu.quality.torch_utils import apply_head, load_strict, read_state_dict, seeded

LAION_AESTHETIC_DIM = 768
"""OpenAI CLIP ViT-L/14's embedding size, the input of sac+logos+ava1-l14-linearMSE.pth."""


class AestheticHead(nn.Module):
    """``input_dim -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropout between and no activations (~1..10).

    The ``layers`` Sequential reproduces the checkpoint's key names (``layers.0``, ``.2``, ``.4``, ``.6``,
    ``.7``); the odd indices are the dropouts.
    """

    def __init__(self, input_dim: int = LAION_AESTHETIC_DIM) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, input_dim]`` L2-normalised embeddings -> ``[B]`` scores."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_checkpoint(cls, path: Path) -> AestheticHead:
        """Load a LAION aesthetic state dict strictly; the input size is read from ``layers.0.weight``."""
        state = read_state_dict(path)
        first_layer = state.get("layers.0.weight")
        head = cls(LAION_AESTHETIC_DIM if first_layer is None else int(first_layer.shape[1]))
        load_strict(head, state, path)
        return head.eval()

    @classmethod
    def tiny(cls, input_dim: int, seed: int = 0) -> AestheticHead:
        """Random-init head of the same architecture (seeded, global RNG untouched)."""
        with seeded(seed):
            return cls(input_dim)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """``[B, input_dim]`` L2-normalised embeddings -> ``[B]`` float32 aesthetic scores."""
        return apply_head(self, embeddings)
