"""Face-swap settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infu.paths import ResolvedPath

RESTORE_SPEC_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
"""``package.module:function``."""


class SwapConfig(BaseModel):
    """Which face swapper puts the reference identity back onto a generated face, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["classical", "simswap", "inswapper"] = Field(
        "classical", description="classical needs no weights (the embedded default); simswap, inswapper"
    )
    variant: Literal["tiny", "full"] = Field(
        "tiny", description="tiny: random-init small model of the real architecture; full: released weights"
    )
    weights: ResolvedPath | None = Field(
        None, description="full variant: SimSwap latest_net_G.pth or insightface inswapper_128.onnx (local)"
    )
    embedding_dim: int = Field(
        128, ge=1, description="identity embedding size the tiny models are built for (dlib: 128)"
    )
    seed: int = Field(0, description="random init of the tiny models")
    restore: str | None = Field(
        None,
        pattern=RESTORE_SPEC_PATTERN,
        description="'module:function' applied to the swapped aligned crop (uint8 RGB in, same out)",
    )
    mask_feather: float = Field(
        0.1, gt=0, lt=0.5, description="paste-back mask erosion, a fraction of the crop side; blur over half"
    )
    device: str = Field(
        "cpu", description="torch device (simswap); cuda* selects onnxruntime's CUDA provider"
    )

    @model_validator(mode="after")
    def _weights_fit_variant(self) -> SwapConfig:
        if self.backend == "classical":
            if self.variant == "full" or self.weights is not None:
                raise ValueError(
                    "swap.backend classical has no weights: leave swap.variant and swap.weights unset"
                )
        elif self.variant == "full" and self.weights is None:
            raise ValueError(
                f"swap.variant full needs swap.weights: the released {self.backend} file "
                f"({'latest_net_G.pth' if self.backend == 'simswap' else 'inswapper_128.onnx'})"
            )
        elif self.variant == "tiny" and self.weights is not None:
            raise ValueError("swap.variant tiny builds a random-init model: swap.weights is for variant full")
        return self
