"""Watermark scores in [0, 1]: LAION's EfficientNet-B3 classifier and a model-free text-overlay detector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from infu.quality.torch_utils import load_strict, read_state_dict, seeded

WATERMARK_THRESHOLD = 0.5
"""Both backends' scores count as "watermarked" at or above this."""
LAION_BACKBONE = "efficientnet_b3"
"""timm name of LAION's backbone: ``efficientnet_b3a`` is an alias of it (same layers, same keys)."""
TINY_BACKBONE = "test_efficientnet"
"""timm's ~0.1 M-parameter EfficientNet (same block types and key layout) for the tiny variant."""
LAION_INPUT_SIZE = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
WATERMARK_CLASS = 0
"""LAION's example_use.py unpacks ``softmax`` as ``water_sym, clear_sym``: class 0 is "watermark"."""


def laion_watermark_network(backbone: str = LAION_BACKBONE) -> nn.Module:
    """A timm EfficientNet whose ``classifier`` is LAION's ``F->625->ReLU->Dropout->256->ReLU->2`` MLP.

    timm's key names (``conv_stem``, ``blocks.*``, ``classifier.{0,3,5}``) are those of LAION's
    ``watermark_model_v1.pt``; torchvision's EfficientNet names its layers differently.
    """
    import timm

    network = timm.create_model(backbone, pretrained=False, num_classes=2)
    network.classifier = nn.Sequential(
        nn.Linear(cast(int, network.num_features), 625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    return network.eval()


class LaionWatermarkClassifier:
    """LAION-5B watermark detector: 256x256 ImageNet-normalised RGB -> P(watermark) = softmax[:, 0]."""

    def __init__(self, network: nn.Module, device: str = "cpu", batch_size: int = 32) -> None:
        self.network = network.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: Path, backbone: str = LAION_BACKBONE, device: str = "cpu", batch_size: int = 32
    ) -> LaionWatermarkClassifier:
        """Load a state dict (``watermark_model_v1.pt`` or ``.safetensors``) strictly into ``backbone``."""
        network = laion_watermark_network(backbone)
        load_strict(network, read_state_dict(path), path)
        return cls(network, device, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", batch_size: int = 32) -> LaionWatermarkClassifier:
        """The same head on timm's tiny test EfficientNet, random-init (seeded, global RNG untouched)."""
        with seeded(seed):
            network = laion_watermark_network(TINY_BACKBONE)
        return cls(network, device, batch_size)

    @staticmethod
    def preprocess(images: Sequence[Image.Image]) -> torch.Tensor:
        """LAION's transform: bilinear resize to 256x256, [0, 1], ImageNet mean/std; ``[B, 3, 256, 256]``."""
        size = (LAION_INPUT_SIZE, LAION_INPUT_SIZE)
        arrays = [
            np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
            for image in images
        ]
        batch = (np.stack(arrays) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[B]`` float32 watermark probabilities."""
        chunks = [np.zeros(0, dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device)
                probabilities = torch.softmax(self.network(pixels).float(), dim=1)[:, WATERMARK_CLASS]
                chunks.append(probabilities.cpu().numpy())
        return np.concatenate(chunks)


@dataclass(frozen=True)
class TextOverlayDetector:
    """Model-free detector of overlaid text (e.g. tiled "© STOCKPHOTO"), deterministic, tens of ms per image.

    On the grey image scaled to ``working_side``: white top-hat (bright text) and black-hat (dark text)
    isolate thin strokes; connected components at several contrast levels are kept as glyphs when their
    height, fill ratio, stroke width (distance-transform ridge: mean relative to height and its
    variation) look like letters; glyphs of similar height whose tops and bottoms align and whose gaps
    are small chain into text lines. The score rises with the glyphs in lines of at least
    ``min_line_glyphs``: ``1 - 2 ** (-glyphs / half_score_glyphs)``, so it is 0.5 at
    ``half_score_glyphs`` glyphs. Tiled overlays score near 1; photos without text 0. A single short
    line (a small corner logo) stays below :data:`WATERMARK_THRESHOLD`: that needs the LAION model.
    """

    working_side: int = 512
    hat_kernel: int = 15
    contrast_levels: tuple[int, ...] = (12, 20, 30, 45)
    glyph_height: tuple[int, int] = (10, 100)
    glyph_fill: tuple[float, float] = (0.15, 0.85)
    stroke_to_height: tuple[float, float] = (0.05, 0.3)
    max_stroke_variation: float = 0.5
    line_height_ratio: float = 1.3
    line_alignment: float = 0.2
    line_gap: float = 0.7
    min_line_glyphs: int = 4
    half_score_glyphs: float = 8.0

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[B]`` float32 text-overlay scores in [0, 1]."""
        return np.array([self.score_image(image) for image in images], dtype=np.float32)

    def score_image(self, image: Image.Image) -> float:
        glyphs = self.line_glyph_count(image)
        return float(1.0 - 2.0 ** (-glyphs / self.half_score_glyphs))

    def line_glyph_count(self, image: Image.Image) -> int:
        """Glyphs that sit in text lines, for bright or dark text, whichever finds more."""
        gray = self._working_gray(image)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (self.hat_kernel, self.hat_kernel))
        counts = []
        for operation in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):
            strokes = cv2.morphologyEx(gray, operation, kernel)
            counts.append(self._glyphs_in_lines(self._glyph_boxes(strokes)))
        return max(counts)

    def _working_gray(self, image: Image.Image) -> np.ndarray:
        gray = image.convert("L")
        scale = self.working_side / max(gray.size)
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        return np.asarray(gray.resize(size, Image.Resampling.BILINEAR))

    def _glyph_boxes(self, strokes: np.ndarray) -> np.ndarray:
        """``[N, 4]`` (x, y, w, h) letter-like components over all contrast levels, duplicates merged."""
        boxes = [box for level in self.contrast_levels for box in self._level_glyphs(strokes > level)]
        return _suppress_duplicates(np.array(boxes, dtype=np.float64).reshape(-1, 4))

    def _level_glyphs(self, mask: np.ndarray) -> list[tuple[int, int, int, int]]:
        mask = mask.astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        x, y, w, h, area = (stats[1:, column] for column in range(5))
        fill = area / np.maximum(w * h, 1)
        plausible = (
            (h >= self.glyph_height[0])
            & (h <= self.glyph_height[1])
            & (w >= 2)
            & (w <= 1.5 * h)
            & (fill >= self.glyph_fill[0])
            & (fill <= self.glyph_fill[1])
        )
        if not plausible.any():
            return []
        distance = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        ridge = (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8))) & (mask > 0)
        glyphs = []
        for index in np.flatnonzero(plausible):
            left, top, width, height = int(x[index]), int(y[index]), int(w[index]), int(h[index])
            window = (slice(top, top + height), slice(left, left + width))
            stroke = 2.0 * distance[window][ridge[window] & (labels[window] == index + 1)]
            mean = float(stroke.mean())
            if (
                self.stroke_to_height[0] <= mean / height <= self.stroke_to_height[1]
                and float(stroke.std()) / mean <= self.max_stroke_variation
            ):
                glyphs.append((left, top, width, height))
        return glyphs

    def _glyphs_in_lines(self, boxes: np.ndarray) -> int:
        """Glyphs in chains (similar height, aligned tops and bottoms, small gaps) of ``min_line_glyphs``+."""
        if len(boxes) < self.min_line_glyphs:
            return 0
        x, y, w, h = (boxes[:, column] for column in range(4))
        taller = np.maximum(h[:, None], h[None, :])
        gap = np.maximum(x[:, None], x[None, :]) - np.minimum((x + w)[:, None], (x + w)[None, :])
        linked = (
            (taller <= self.line_height_ratio * np.minimum(h[:, None], h[None, :]))
            & (np.abs(y[:, None] - y[None, :]) <= self.line_alignment * taller)
            & (np.abs((y + h)[:, None] - (y + h)[None, :]) <= self.line_alignment * taller)
            & (gap >= 0)
            & (gap <= self.line_gap * taller)
        )
        _, line_of = connected_components(coo_matrix(linked), directed=False)
        line_sizes = np.bincount(line_of)
        return int(line_sizes[line_sizes >= self.min_line_glyphs].sum())


def _suppress_duplicates(boxes: np.ndarray, max_overlap: float = 0.5) -> np.ndarray:
    """Largest-first: drop a box whose IoU with a kept one exceeds ``max_overlap``."""
    kept: list[np.ndarray] = []
    for box in boxes[np.argsort(-(boxes[:, 2] * boxes[:, 3]), kind="stable")]:
        if not kept or _iou(box, np.array(kept)).max() <= max_overlap:
            kept.append(box)
    return np.array(kept).reshape(-1, 4)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    overlap_w = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2]) - np.maximum(box[0], others[:, 0])
    overlap_h = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3]) - np.maximum(box[1], others[:, 1])
    overlap = np.clip(overlap_w, 0, None) * np.clip(overlap_h, 0, None)
    return overlap / (box[2] * box[3] + others[:, 2] * others[:, 3] - overlap)
