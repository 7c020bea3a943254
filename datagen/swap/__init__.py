"""Face-swap post-processing of SPMS synthesis: the reference identity put back onto a generated face.

``build_swapper(SwapConfig(...))`` returns one :class:`FaceSwapper` of three backends: ``classical``
(no weights: keypoint warp, colour transfer, Poisson blending), ``simswap`` (torch) and ``inswapper``
(onnxruntime); each backend's libraries are imported only when it is built.
"""

from __future__ import annotations

from datagen.swap.base import FaceSwapper, Restorer, feathered_mask, paste_back, resolve_restore
from datagen.swap.config import SwapConfig


def build_swapper(config: SwapConfig) -> FaceSwapper:
    """The configured swapper: model loaded (weights from local paths only), restore hook resolved."""
    restore = resolve_restore(config.restore)
    if config.backend == "classical":
        from datagen.swap.classical import ClassicalSwapper

        return ClassicalSwapper(restore, config.mask_feather)
    if config.backend == "simswap":
        from datagen.swap.simswap import SimSwapGenerator, SimSwapSwapper

        generator = (
            SimSwapGenerator.from_pretrained(config.weights)
            if config.weights is not None
            else SimSwapGenerator.tiny(config.embedding_dim, seed=config.seed)
        )
        return SimSwapSwapper(generator, config.device, restore, config.mask_feather)
    from datagen.swap.inswapper import InSwapper

    if config.weights is not None:
        return InSwapper.from_onnx(config.weights, config.device, restore, config.mask_feather)
    return InSwapper.tiny(
        config.embedding_dim,
        seed=config.seed,
        device=config.device,
        restore=restore,
        mask_feather=config.mask_feather,
    )


__all__ = [
    "FaceSwapper",
    "Restorer",
    "SwapConfig",
    "build_swapper",
    "feathered_mask",
    "paste_back",
    "resolve_restore",
]
