"""The face-swapper interface, the shared paste-back and the optional restoration hook."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import cv2
import numpy as np

from infu.face.align import align_face, alignment_matrix
from infu.face.base import Face, l2_normalize

Restorer = Callable[[np.ndarray], np.ndarray]
"""A face restorer: an aligned HxWx3 uint8 RGB crop in, a crop of the same shape and dtype out."""


def resolve_restore(spec: str | None) -> Restorer | None:
    """The function a ``"module:function"`` string names (None for None); ValueError if it is not there."""
    if spec is None:
        return None
    module_name, separator, function_name = spec.partition(":")
    if not separator or not module_name or not function_name:
        raise ValueError(f"swap.restore {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"swap.restore {spec!r}: cannot import module {module_name!r}: {error}") from error
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(f"swap.restore {spec!r}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise ValueError(f"swap.restore {spec!r}: {module_name}.{function_name} is not callable")
    return function


def check_rgb(image: np.ndarray, what: str) -> None:
    """ValueError unless ``image`` is an HxWx3 uint8 array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")


def feathered_mask(crop_size: int, feather: float) -> np.ndarray:
    """(crop_size, crop_size) float32 blend weights: the crop's all-ones mask eroded by ``feather`` of its
    side, its edge Gaussian-blurred over half that margin, so the crop border itself weighs 0."""
    margin = max(1, round(feather * crop_size))
    mask = np.zeros((crop_size, crop_size), np.float32)
    mask[margin:-margin, margin:-margin] = 1.0
    kernel = 2 * (margin // 2) + 1
    return cv2.GaussianBlur(mask, (kernel, kernel), 0)


def paste_back(target: np.ndarray, crop: np.ndarray, matrix: np.ndarray, feather: float) -> np.ndarray:
    """``crop`` (square, cut from ``target`` with the 2x3 ``matrix``) warped back into ``target`` and blended
    with :func:`feathered_mask`; pixels the crop does not cover stay exactly as they were."""
    height, width = target.shape[:2]
    crop_size = crop.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [crop_size, 0], [0, crop_size], [crop_size, crop_size]], np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    result = target.copy()
    if x1 <= x0 or y1 <= y0:
        return result
    # Warp only into the region the crop covers: the same inverse, shifted to that region's origin.
    region_inverse = inverse.copy()
    region_inverse[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(crop.astype(np.float32), region_inverse, size, flags=cv2.INTER_LINEAR)
    weight = cv2.warpAffine(feathered_mask(crop_size, feather), region_inverse, size, flags=cv2.INTER_LINEAR)
    region = target[y0:y1, x0:x1].astype(np.float32)
    blended = region + weight[..., None] * (warped - region)
    result[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


def restored(restore: Restorer, crop: np.ndarray) -> np.ndarray:
    """``restore(crop)``, checked to keep the crop's shape and dtype."""
    out = np.asarray(restore(crop))
    if out.shape != crop.shape or out.dtype != crop.dtype:
        raise ValueError(
            f"the restoration hook returned {out.dtype} {out.shape} for a {crop.dtype} {crop.shape} crop"
        )
    return out


class FaceSwapper(ABC):
    """Puts a source identity onto a target face; ``restore`` runs on the swapped aligned crop."""

    name: ClassVar[str]

    def __init__(self, restore: Restorer | None = None, mask_feather: float = 0.1):
        if not 0 < mask_feather < 0.5:
            raise ValueError(f"mask_feather must be in (0, 0.5) of the crop side, got {mask_feather}")
        self.restore = restore
        self.mask_feather = mask_feather

    @abstractmethod
    def swap(
        self, target: np.ndarray, target_face: Face, source: np.ndarray, source_face: Face
    ) -> np.ndarray:
        """``target`` (HxWx3 uint8 RGB) with ``source_face``'s identity (from image ``source``) on
        ``target_face``: same shape and dtype."""


class AlignedCropSwapper(FaceSwapper):
    """A model swapping the ArcFace-aligned ``crop_size`` crop of the target face to the source embedding
    (the source image itself is not used)."""

    crop_size: int

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """The identity embedding size the model is built for."""

    @abstractmethod
    def swap_crop(self, crop: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """The aligned ``crop`` (uint8 RGB) with the identity of the L2-normalised ``embedding``."""

    def check_embedding(self, embedding: np.ndarray) -> np.ndarray:
        """The embedding flattened and L2-normalised; ValueError naming both dims when it does not fit."""
        vector = np.asarray(embedding).ravel()
        if vector.shape[0] != self.embedding_dim:
            raise ValueError(
                f"{self.name} expects a {self.embedding_dim}-D identity embedding, got {vector.shape[0]}-D "
                f"(the recognizer's embedding space must match the swapper's)"
            )
        return l2_normalize(vector)

    def swap(
        self, target: np.ndarray, target_face: Face, source: np.ndarray, source_face: Face
    ) -> np.ndarray:
        check_rgb(target, "target")
        embedding = self.check_embedding(source_face.embedding)
        crop = align_face(target, target_face.kps, self.crop_size)
        swapped = self.swap_crop(crop, embedding)
        if self.restore is not None:
            swapped = restored(self.restore, swapped)
        return paste_back(
            target, swapped, alignment_matrix(target_face.kps, self.crop_size), self.mask_feather
        )
