"""Identity mixing (after Infinite-ID): a weighted blend of several identities' face embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

EmbeddingLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_vector(embedding: EmbeddingLike) -> torch.Tensor:
    if isinstance(embedding, torch.Tensor):
        return embedding.detach().to("cpu", torch.float32).flatten()
    return torch.as_tensor(np.asarray(embedding, dtype=np.float32)).flatten()


def _unit(vector: torch.Tensor, what: str) -> torch.Tensor:
    norm = torch.linalg.vector_norm(vector)
    if not torch.isfinite(norm) or norm <= 1e-12:
        raise ValueError(f"{what} has zero or non-finite length and cannot be normalised")
    return vector / norm


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Validate mixing weights (one per identity, finite, >= 0, not all 0) and scale them to sum to 1."""
    if count < 1:
        raise ValueError("identity mixing needs at least one identity")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(weight) for weight in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} mixing weights for {count} identities")
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise ValueError(f"mixing weights must be finite and non-negative, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixing weights must not all be zero, got {weights}")
    return [weight / total for weight in weights]


def mix_identities(
    embeddings: Sequence[EmbeddingLike], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``sum_i w_i * e_i / |e_i|`` renormalised to unit length; ``[D]`` float32.

    Weights default to equal; they are validated and rescaled to sum to 1 before mixing.
    """
    weights = normalise_weights(weights, len(embeddings))
    vectors = [_as_vector(embedding) for embedding in embeddings]
    if len({vector.numel() for vector in vectors}) != 1:
        raise ValueError(f"identity embeddings differ in size: {[vector.numel() for vector in vectors]}")
    mixed = sum(
        weight * _unit(vector, f"identity embedding {index}")
        for index, (weight, vector) in enumerate(zip(weights, vectors, strict=True))
    )
    return _unit(mixed, "the mixed identity embedding (opposite identities cancel out)")
