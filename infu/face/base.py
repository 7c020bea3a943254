"""What every face backend returns and the helpers built on it: the largest face, similarity, ID Loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from infu.face.config import FaceConfig
from infu.face.recognizer import Recognizer
from infu.images import BadImageError, ImageInput, load_rgb

KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
"""ArcFace keypoint order; "left" is the image's left (the subject's right), as insightface does."""


class NoFaceError(LookupError):
    """An image in which a caller that needs a face found none."""

    def __init__(self, source: str):
        super().__init__(f"no face found in {source}")
        self.source = source


class HeadPose(NamedTuple):
    """Head rotation in degrees.

    ``yaw`` > 0: the nose points to the image's right; ``pitch`` > 0: the face looks up; ``roll`` > 0:
    the head tilts clockwise about the nose axis. Measured against the line of sight to the face, so all
    are zero for an upright face looking straight into the camera.
    """

    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in image pixel coordinates."""

    bbox: np.ndarray
    """(4,) float32 x1, y1, x2, y2."""
    score: float
    """Detection confidence: a probability for insightface, the HOG SVM margin (> 0) for dlib."""
    kps: np.ndarray
    """(5, 2) float32 keypoints in :data:`KEYPOINT_NAMES` order."""
    embedding: np.ndarray
    """(D,) float32 L2-normalised identity embedding in the analyzer's ``embedding_space``."""
    pose: HeadPose | None
    """None only when the backend has no landmark model to estimate it from."""

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row (a 1-D input is one row) divided by its L2 norm, as float32 (zero rows stay zero)."""
    matrix = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """``vector`` flattened and divided by its L2 norm, as float32 (a zero vector stays zero)."""
    return normalize_rows(np.asarray(vector).ravel())[0]


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box area (how InfU picks the identity face), or None."""
    return max(faces, key=lambda face: face.area, default=None)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings (0 when either is all zeros)."""
    return float(np.dot(l2_normalize(a), l2_normalize(b)))


def id_loss(a: np.ndarray, b: np.ndarray) -> float:
    """ID Loss = 1 - cosine similarity of two identity embeddings (0 = same identity direction)."""
    return 1.0 - cosine_similarity(a, b)


def face_rows(faces: Sequence[Face]) -> list[dict[str, Any]]:
    """Faces as rows of the records' ``faces`` column (:data:`infu.records.FACE_TYPE`)."""
    return [
        {
            "bbox": [float(value) for value in face.bbox],
            "score": float(face.score),
            "keypoints": [float(value) for value in np.asarray(face.kps).reshape(-1)],
            "yaw": face.pose.yaw if face.pose else None,
            "pitch": face.pose.pitch if face.pose else None,
            "roll": face.pose.roll if face.pose else None,
        }
        for face in faces
    ]


BatchResult = list[Face] | BadImageError
"""Per image of a batch: its faces, or why it is not a usable image."""


class FaceAnalyzer(ABC):
    """Detects faces, their keypoints and head pose, and embeds them with the configured recognizer."""

    backend: ClassVar[str]
    recognizer: Recognizer

    def __init__(self, config: FaceConfig):
        self.config = config

    @property
    def embedding_space(self) -> str:
        """Which space the embeddings are in (``face.recognizer``): only same-space embeddings compare."""
        return self.recognizer.embedding_space

    @property
    def embedding_dim(self) -> int:
        return self.recognizer.embedding_dim

    @abstractmethod
    def analyze_rgb(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an upright HxWx3 uint8 RGB array."""

    def load(self, image: ImageInput) -> np.ndarray:
        """Any accepted input -> upright RGB uint8 array; raises :class:`BadImageError`."""
        return np.asarray(load_rgb(image, self.config.max_pixels))

    def analyze(self, image: ImageInput) -> list[Face]:
        """Faces in a path, bytes, PIL image or RGB array; raises :class:`BadImageError` on bad input."""
        return self.analyze_rgb(self.load(image))

    def analyze_batch(self, images: Sequence[ImageInput]) -> list[BatchResult]:
        """:meth:`analyze` per image; a bad image yields its :class:`BadImageError` instead of raising."""
        results: list[BatchResult] = []
        for image in images:
            try:
                results.append(self.analyze(image))
            except BadImageError as error:
                results.append(error)
        return results

    def largest(self, image: ImageInput) -> Face | None:
        return largest_face(self.analyze(image))

    def require_largest(self, image: ImageInput, name: str | None = None) -> Face:
        """The largest face; :class:`NoFaceError` naming ``name`` (or the path) when there is none."""
        face = self.largest(image)
        if face is None:
            raise NoFaceError(name or (str(image) if isinstance(image, (str, Path)) else "the image"))
        return face
