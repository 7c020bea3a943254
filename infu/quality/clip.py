"""CLIP image embeddings: the one representation the aesthetic and NSFW heads read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from infu.quality.torch_utils import seeded

TINY_IMAGE_SIZE = 64
TINY_PROJECTION_DIM = 32


def tiny_clip_config() -> CLIPVisionConfig:
    """A CLIP vision tower with ViT-L/14's layout at toy size (64 px input, 8 px patches, 32-D output)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        projection_dim=TINY_PROJECTION_DIM,
    )


class ClipImageEmbedder:
    """``CLIPVisionModelWithProjection`` + its image processor -> L2-normalised float32 embeddings."""

    def __init__(
        self,
        model: CLIPVisionModelWithProjection,
        processor: CLIPImageProcessor,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval().to(torch.device(device))
        self.processor = processor
        self.device = device
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path: Path, device: str = "cpu", batch_size: int = 32) -> ClipImageEmbedder:
        """Load a local transformers CLIP folder (a full CLIP model or its vision tower); never downloads."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP model folder {path} does not exist")
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        return cls(model, processor, device, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", batch_size: int = 32) -> ClipImageEmbedder:
        """Random-init tiny CLIP (seeded, global RNG untouched) with CLIP's preprocessing at 64 px."""
        with seeded(seed):
            model = CLIPVisionModelWithProjection(tiny_clip_config())
        processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        return cls(model, processor, device, batch_size)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[B, dim]`` float32 image embeddings, each of unit L2 norm."""
        chunks = [np.zeros((0, self.dim), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
                embeds = self.model(pixel_values=pixels).image_embeds
                chunks.append(torch.nn.functional.normalize(embeds.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks)
