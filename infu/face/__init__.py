"""Face stack: detection, 5 keypoints, alignment, identity embedding, head pose and the control image.

``load_face_analyzer(FaceConfig(...))`` returns the dlib (embedded) or insightface (production) backend
behind one :class:`FaceAnalyzer` interface; ``load_recognizer(FaceConfig(...))`` the identity embedder
alone (``face.recognizer``, whose ``embedding_space`` every embedding belongs to).
"""

from __future__ import annotations

from infu.face.align import ARCFACE_TEMPLATE, align_face
from infu.face.base import (
    KEYPOINT_NAMES,
    BatchResult,
    Face,
    FaceAnalyzer,
    HeadPose,
    NoFaceError,
    cosine_similarity,
    face_rows,
    id_loss,
    largest_face,
)
from infu.face.config import FaceConfig
from infu.face.control import KEYPOINT_COLORS, black_control, draw_keypoints_control, resize_and_pad_image
from infu.face.ray_batch import FaceBatchAnnotator
from infu.face.recognizer import (
    EMBEDDING_DIMS,
    SAME_IDENTITY_SIMILARITY,
    EmbeddingSpace,
    FaceModelsError,
    Recognizer,
    load_recognizer,
)
from infu.images import BadImageError


def load_face_analyzer(config: FaceConfig) -> FaceAnalyzer:
    """The configured backend with its models loaded (only that backend's libraries are imported)."""
    if config.backend == "dlib":
        from infu.face.dlib_backend import DlibFaceAnalyzer

        return DlibFaceAnalyzer(config)
    from infu.face.insightface_backend import InsightFaceAnalyzer

    return InsightFaceAnalyzer(config)


__all__ = [
    "ARCFACE_TEMPLATE",
    "EMBEDDING_DIMS",
    "SAME_IDENTITY_SIMILARITY",
    "KEYPOINT_COLORS",
    "KEYPOINT_NAMES",
    "BadImageError",
    "BatchResult",
    "EmbeddingSpace",
    "Face",
    "FaceAnalyzer",
    "FaceBatchAnnotator",
    "FaceConfig",
    "FaceModelsError",
    "HeadPose",
    "NoFaceError",
    "Recognizer",
    "align_face",
    "black_control",
    "cosine_similarity",
    "face_rows",
    "draw_keypoints_control",
    "id_loss",
    "largest_face",
    "load_face_analyzer",
    "load_recognizer",
    "resize_and_pad_image",
]
