"""Weight-free face swap: the source face warped onto the target's keypoints, colour-matched and
Poisson-blended (``cv2.seamlessClone``) into the target."""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from datagen.swap.base import FaceSwapper, check_rgb, paste_back, restored
from infu.face.align import TEMPLATE_SIZE, align_face, alignment_matrix, similarity_transform
from infu.face.base import Face

FACE_ELLIPSE_CENTRE = (56.0, 70.0)
FACE_ELLIPSE_AXES = (34.0, 44.0)
"""The face region in the 112x112 ArcFace template frame (eyes at y 51.6, mouth corners at y 92.3): from
the eyebrows to the chin and across both cheeks, short of the hairline and the jaw outline."""

BORDER_MARGIN = 2
"""Pixels kept clear of the image border: ``seamlessClone`` needs its mask off the border."""

RESTORE_CROP_SIZE = 512
"""The aligned crop the restoration hook sees (what GFPGAN and CodeFormer work on)."""


def face_mask(shape: tuple[int, ...], kps: np.ndarray) -> np.ndarray:
    """HxW uint8 mask (255 inside) of the face with keypoints ``kps``: the template ellipse in image space."""
    angles = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
    unit_circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    template_points = np.asarray(FACE_ELLIPSE_CENTRE) + unit_circle * np.asarray(FACE_ELLIPSE_AXES)
    to_image = cv2.invertAffineTransform(alignment_matrix(kps, TEMPLATE_SIZE))
    points = template_points @ to_image[:, :2].T + to_image[:, 2]
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, np.round(points * 16).astype(np.int32), 255, cv2.LINE_8, shift=4)
    return mask


def match_colour(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with each LAB channel's mean and std within ``mask`` moved to ``reference``'s there."""
    image_lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    reference_lab = cv2.cvtColor(reference.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    inside = mask > 0
    image_pixels, reference_pixels = image_lab[inside], reference_lab[inside]
    scale = reference_pixels.std(axis=0) / np.maximum(image_pixels.std(axis=0), 1e-3)
    corrected = (image_lab - image_pixels.mean(axis=0)) * scale + reference_pixels.mean(axis=0)
    rgb = cv2.cvtColor(corrected.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def soft_edge(mask: np.ndarray, feather: float) -> np.ndarray:
    """HxW float32 weights: ``mask`` Gaussian-blurred by a kernel half ``feather`` times the face side (the
    square root of its area) wide, so they are exactly 0 beyond half the kernel outside the mask."""
    side = np.sqrt(np.count_nonzero(mask))
    kernel = 2 * round(feather * side / 4) + 1
    return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (kernel, kernel), 0)


class ClassicalSwapper(FaceSwapper):
    """5-keypoint similarity warp of the source face, LAB colour transfer, ``NORMAL_CLONE`` blending kept
    to the face mask by a :func:`soft_edge`; ``restore`` runs on the 512 aligned crop of the result."""

    name: ClassVar[str] = "classical"

    def swap(
        self, target: np.ndarray, target_face: Face, source: np.ndarray, source_face: Face
    ) -> np.ndarray:
        check_rgb(target, "target")
        check_rgb(source, "source")
        height, width = target.shape[:2]
        to_target = similarity_transform(source_face.kps, target_face.kps)
        warped = cv2.warpAffine(
            np.ascontiguousarray(source), to_target, (width, height), flags=cv2.INTER_LINEAR
        )
        covered = cv2.warpAffine(np.full(source.shape[:2], 255, np.uint8), to_target, (width, height))
        mask = face_mask(target.shape, target_face.kps)
        mask[covered < 255] = 0  # only pixels the source image really has
        mask[:BORDER_MARGIN], mask[-BORDER_MARGIN:] = 0, 0
        mask[:, :BORDER_MARGIN], mask[:, -BORDER_MARGIN:] = 0, 0
        x, y, box_width, box_height = cv2.boundingRect(mask)
        if box_width < 3 or box_height < 3:
            return target.copy()
        corrected = match_colour(warped, target, mask)
        # seamlessClone places the mask's bounding box centred on ``centre``: here, exactly where it is.
        centre = (x + box_width // 2, y + box_height // 2)
        # (OpenCV 5 writes into the mask it is given: hand it a copy.)
        cloned = cv2.seamlessClone(
            corrected, np.ascontiguousarray(target), mask.copy(), centre, cv2.NORMAL_CLONE
        )
        # The Poisson solve moves the whole bounding box a little: keep the clone only around the mask.
        weight = soft_edge(mask, self.mask_feather)
        blended = target + weight[..., None] * (cloned.astype(np.float32) - target)
        result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        if self.restore is not None:
            crop = restored(self.restore, align_face(result, target_face.kps, RESTORE_CROP_SIZE))
            matrix = alignment_matrix(target_face.kps, RESTORE_CROP_SIZE)
            result = paste_back(result, crop, matrix, self.mask_feather)
        return result
