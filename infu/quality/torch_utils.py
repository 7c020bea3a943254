"""Torch helpers shared by the quality models: safe state-dict files, seeded init, running a head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Config dtype names -> torch dtypes."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch-saved state dict (``weights_only``, mapped to CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` (read from ``source``) into ``module``; every key and shape must match."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source} does not fit {type(module).__name__}: {error}") from error


def save_weights(module: nn.Module, path: Path) -> Path:
    """Write ``module``'s state dict as safetensors (``.safetensors``) or a torch file (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``; the caller's global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def apply_head(head: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """Run ``head`` on ``[B, D]`` embeddings under ``inference_mode``; ``[B]`` float32 on the CPU."""
    parameter = next(head.parameters())
    with torch.inference_mode():
        batch = torch.as_tensor(np.asarray(embeddings), dtype=parameter.dtype, device=parameter.device)
        return head(batch).float().cpu().numpy()


def weights_digest(*modules: nn.Module | None) -> str:
    """A sha256 over the modules' state dicts (names, dtypes, shapes and bytes): equal exactly when the
    weights are, whatever path they were loaded from (``None`` modules count as absent)."""
    import hashlib

    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        digest.update(f"module {index}: {type(module).__name__}\n".encode())
        for name, tensor in sorted((module.state_dict() if module is not None else {}).items()):
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{name} {value.dtype} {tuple(value.shape)}\n".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
