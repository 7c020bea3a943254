"""The InfuseNet control image: the 5 face keypoints drawn on black, as the official InfU code draws them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
"""RGB colour of keypoints 0..4 (left eye, right eye, nose, left mouth corner, right mouth corner)."""
NOSE = 2
LIMB_ENDS = (0, 1, 3, 4)
"""Each of these points is joined to the nose by a limb drawn in its own colour."""
STICK_WIDTH = 4
LIMB_DIMMING = 0.6
POINT_RADIUS = 10


def draw_keypoints_control(size: tuple[int, int], kps: np.ndarray) -> Image.Image:
    """RGB control image of ``size`` (width, height): dimmed limb ellipses to the nose, then point discs."""
    width, height = size
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    nose_x, nose_y = kps[NOSE]
    for index in LIMB_ENDS:
        x, y = kps[index]
        half_length = int(math.hypot(x - nose_x, y - nose_y) / 2)
        angle = int(math.degrees(math.atan2(y - nose_y, x - nose_x)))
        centre = (int((x + nose_x) / 2), int((y + nose_y) / 2))
        polygon = cv2.ellipse2Poly(centre, (half_length, STICK_WIDTH), angle, 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLORS[index])
    control = (canvas * LIMB_DIMMING).astype(np.uint8)
    for (x, y), color in zip(kps, KEYPOINT_COLORS, strict=True):
        cv2.circle(control, (int(x), int(y)), POINT_RADIUS, color, -1)
    return Image.fromarray(control)


def black_control(size: tuple[int, int]) -> Image.Image:
    """All-black control image of ``size`` (width, height): no pose guidance."""
    width, height = size
    return Image.new("RGB", (width, height))


@dataclass(frozen=True)
class Padded:
    """An image fitted into a target size, and where its keypoints went."""

    image: Image.Image
    kps: np.ndarray | None
    scale: tuple[float, float]
    offset: tuple[int, int]


def resize_and_pad(image: Image.Image, size: tuple[int, int], kps: np.ndarray | None = None) -> Padded:
    """Fit ``image`` inside ``size`` (width, height) keeping its aspect, centred on black; maps ``kps``."""
    target_width, target_height = size
    width, height = image.size
    fit = min(target_width / width, target_height / height)
    new_width = min(target_width, max(1, round(width * fit)))
    new_height = min(target_height, max(1, round(height * fit)))
    offset = ((target_width - new_width) // 2, (target_height - new_height) // 2)
    canvas = Image.new("RGB", (target_width, target_height))
    canvas.paste(image.convert("RGB").resize((new_width, new_height), Image.Resampling.LANCZOS), offset)
    scale = (new_width / width, new_height / height)
    mapped = None
    if kps is not None:
        mapped = np.asarray(kps, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    return Padded(canvas, mapped, scale, offset)
