"""The InfuseNet control image: the 5 face keypoints drawn on black, and the pose photo they are found in,
both prepared as the official InfU code does."""

from __future__ import annotations

import math

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


WHITE = (255, 255, 255)


def resize_and_pad_image(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The released InfU pose-photo preparation: ``photo`` scaled (LANCZOS) so its width fills a portrait or
    square ``size`` (width, height), or its height a landscape one, centred on white; overflow is cropped."""
    target_width, target_height = size
    width, height = photo.size
    # the release's float expressions and truncation, kept as is: they decide sizes to the pixel
    if target_width <= target_height:
        new_width, new_height = target_width, int(target_width * (height / width))
    else:
        new_width, new_height = int(target_height * (width / height)), target_height
    new_size = (max(1, new_width), max(1, new_height))  # the release fails on a 0-pixel side instead
    resized = photo.convert("RGB").resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (target_width, target_height), WHITE)
    canvas.paste(resized, ((target_width - resized.width) // 2, (target_height - resized.height) // 2))
    return canvas
