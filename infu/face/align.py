"""ArcFace alignment: a similarity transform of the 5 keypoints onto the standard 112x112 template."""

from __future__ import annotations

import cv2
import numpy as np

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
"""Where the 5 keypoints (left eye, right eye, nose, left/right mouth corner) land in a 112x112 crop."""

TEMPLATE_SIZE = 112


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping ``source`` onto ``target`` (Umeyama).

    Returns the 2x3 matrix for ``cv2.warpAffine``.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    reflection = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        reflection[1, 1] = -1.0
    rotation = u @ reflection @ vt
    source_variance = source_centred.var(axis=0).sum()
    scale = float(np.sum(singular * np.diag(reflection)) / source_variance) if source_variance > 0 else 1.0
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def template_for(size: int) -> np.ndarray:
    """The template for a ``size`` crop: scaled for multiples of 112; for multiples of 128 scaled from a
    112 crop centred in 128 (insightface's convention)."""
    if size % TEMPLATE_SIZE == 0 or size % 128:
        return ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)
    ratio = size / 128
    return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])


def alignment_matrix(kps: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """2x3 matrix taking image keypoints onto the template of a ``size`` x ``size`` crop."""
    return similarity_transform(kps, template_for(size))


def align_face(image: np.ndarray, kps: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The ArcFace-aligned ``size`` x ``size`` crop of ``image`` (HxWxC array); outside pixels are black."""
    matrix = alignment_matrix(kps, size)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderValue=0.0)
