"""Infinite-ID (ECCV 2024) on SDXL: identity mappers, identity cross-attention, mixed self-attention.

``mappers`` (CLIP Mapper, Face Mapper, :class:`IdentityEncoder`, identity mixing), ``attention`` (AdaIN,
the attention processors and their installation on a UNet), ``adapter`` (:class:`InfiniteIdAdapter`, the
trainable weights with save/load and ``attach``).
"""

from infu.model.infinite_id.adapter import InfiniteIdAdapter
from infu.model.infinite_id.attention import (
    ATTENTION_KWARGS,
    IdentityCrossAttnProcessor,
    MixedSelfAttnProcessor,
    adain,
    adain_mean,
    attach_identity_processors,
    identity_layer_dims,
    install_identity_processors,
)
from infu.model.infinite_id.mappers import ClipMapper, FaceMapper, IdentityEncoder, mix_identities
from infu.model.infinite_id.pipeline import InfiniteIdPipeline

__all__ = [
    "ATTENTION_KWARGS",
    "ClipMapper",
    "FaceMapper",
    "IdentityCrossAttnProcessor",
    "IdentityEncoder",
    "InfiniteIdAdapter",
    "InfiniteIdPipeline",
    "MixedSelfAttnProcessor",
    "adain",
    "adain_mean",
    "attach_identity_processors",
    "identity_layer_dims",
    "install_identity_processors",
    "mix_identities",
]
