"""Image-quality heads for the SPSS filter: aesthetic (LAION), NSFW (LAION CLIP head) and watermark scores.

``QualityScorer(QualityConfig(...)).score(images)`` embeds each image once with CLIP and returns
``aesthetic``, ``nsfw``, ``watermark`` and ``clip_embedding``. Only :class:`QualityConfig` is imported
eagerly; the torch-backed classes load on first attribute access, so configs validate without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from infu.quality.config import QualityConfig

if TYPE_CHECKING:
    from infu.quality.aesthetic import AestheticHead
    from infu.quality.clip import ClipImageEmbedder
    from infu.quality.nsfw import NsfwHead
    from infu.quality.scorer import QualityScorer
    from infu.quality.watermark import WATERMARK_THRESHOLD, LaionWatermarkClassifier, TextOverlayDetector

_LAZY = {
    "AestheticHead": "infu.quality.aesthetic",
    "ClipImageEmbedder": "infu.quality.clip",
    "LaionWatermarkClassifier": "infu.quality.watermark",
    "NsfwHead": "infu.quality.nsfw",
    "QualityScorer": "infu.quality.scorer",
    "TextOverlayDetector": "infu.quality.watermark",
    "WATERMARK_THRESHOLD": "infu.quality.watermark",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "WATERMARK_THRESHOLD",
    "AestheticHead",
    "ClipImageEmbedder",
    "LaionWatermarkClassifier",
    "NsfwHead",
    "QualityConfig",
    "QualityScorer",
    "TextOverlayDetector",
]
