"""One object that loads CLIP and the quality heads once and scores batches of images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from infu.quality.aesthetic import AestheticHead
from infu.quality.clip import ClipImageEmbedder
from infu.quality.config import QualityConfig
from infu.quality.nsfw import NsfwHead
from infu.quality.watermark import LaionWatermarkClassifier, TextOverlayDetector

AESTHETIC = "aesthetic"
NSFW = "nsfw"
WATERMARK = "watermark"
CLIP_EMBEDDING = "clip_embedding"


class QualityScorer:
    """CLIP embedding + aesthetic, NSFW and watermark scores per image.

    Build it once per worker (a Ray ``map_batches`` callable class, a curator stage's ``setup()``) and
    call :meth:`score` per batch. The tiny variant is seeded from ``tiny_seed`` (each model its own
    offset) without touching the global RNG, so equal configs score identically.
    """

    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        seed, device, batch_size = config.tiny_seed, config.device, config.batch_size
        if config.variant == "full":
            assert config.clip_model and config.aesthetic_head and config.nsfw_head  # validated by config
            self.embedder = ClipImageEmbedder.from_pretrained(config.clip_model, device, batch_size)
            self.aesthetic = AestheticHead.from_checkpoint(config.aesthetic_head)
            self.nsfw = NsfwHead.from_checkpoint(config.nsfw_head)
        else:
            self.embedder = ClipImageEmbedder.tiny(seed, device, batch_size)
            self.aesthetic = AestheticHead.tiny(self.embedder.dim, seed + 1)
            self.nsfw = NsfwHead.tiny(self.embedder.dim, seed + 2)
        for name, head in ((AESTHETIC, self.aesthetic), (NSFW, self.nsfw)):
            if head.input_dim != self.embedder.dim:
                raise ValueError(
                    f"{name} head expects {head.input_dim}-D embeddings but the CLIP model "
                    f"{config.clip_model} gives {self.embedder.dim}-D"
                )
            head.to(device)
        self.watermark: LaionWatermarkClassifier | TextOverlayDetector
        if config.watermark_backend == "text_overlay":
            self.watermark = TextOverlayDetector()
        elif config.variant == "full":
            assert config.watermark_model  # validated by config
            self.watermark = LaionWatermarkClassifier.from_checkpoint(
                config.watermark_model, device=device, batch_size=batch_size
            )
        else:
            self.watermark = LaionWatermarkClassifier.tiny(seed + 3, device, batch_size)

    @classmethod
    def resources(cls, config: QualityConfig) -> dict[str, float]:
        """Ray resources of one worker: a GPU when the models run on CUDA, one CPU either way."""
        return {"num_cpus": 1.0, "num_gpus": 1.0 if config.device.startswith("cuda") else 0.0}

    def score(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """``aesthetic``, ``nsfw``, ``watermark``: [B] float32; ``clip_embedding``: [B, D] unit rows."""
        embeddings = self.embedder.embed(images)
        return {
            AESTHETIC: self.aesthetic.score(embeddings),
            NSFW: self.nsfw.score(embeddings),
            WATERMARK: self.watermark.score(images),
            CLIP_EMBEDDING: embeddings,
        }
