"""What the pipelines are conditioned on, from photos: identity embeddings, keypoint control images (InfU)
and aligned face crops (Infinite-ID's image tower).

These need only a face analyzer (no diffusion model), so callers can validate inputs before loading FLUX.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infu.face import (
    Face,
    FaceAnalyzer,
    NoFaceError,
    align_face,
    draw_keypoints_control,
    largest_face,
    resize_and_pad_image,
)
from infu.images import ImageInput, load_rgb
from infu.model.mixing import mix_identities


def describe(image: ImageInput) -> str:
    """How errors name an image: its path, or its type."""
    return str(image) if isinstance(image, (str, Path)) else f"the {type(image).__name__} image"


def required_face(analyzer: FaceAnalyzer, image: ImageInput, name: str | None = None) -> Face:
    """The largest face in ``image``; :class:`NoFaceError` names ``name`` (default: the path) if none."""
    face = largest_face(analyzer.analyze(image))
    if face is None:
        raise NoFaceError(name or describe(image))
    return face


def identity_from_images(
    analyzer: FaceAnalyzer, images: Sequence[ImageInput], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``[D]`` unit embedding of one id image, or the weighted mix of several (Infinite-ID mixing)."""
    embeddings = [np.asarray(required_face(analyzer, image).embedding, dtype=np.float32) for image in images]
    return mix_identities(embeddings, weights)


def keypoint_control(
    analyzer: FaceAnalyzer, control_image: ImageInput, width: int, height: int
) -> Image.Image:
    """The pose photo ``control_image`` as the release prepares it: resized and padded to ``width`` x
    ``height`` (:func:`resize_and_pad_image`), its largest face's keypoints found on that canvas, drawn."""
    canvas = resize_and_pad_image(load_rgb(control_image), (width, height))
    face = required_face(analyzer, canvas, describe(control_image))
    return draw_keypoints_control((width, height), face.kps)


def aligned_face_pixels(rgb: np.ndarray, kps: np.ndarray, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [0, 1]: the face with keypoints ``kps`` in ``rgb`` (an RGB array), aligned on
    the ArcFace template: what the image tower reads of an identity photo."""
    crop = align_face(rgb, kps, size=size)
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255
