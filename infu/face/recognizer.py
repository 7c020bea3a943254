"""Identity embedding of a face given by an image and its 5 keypoints, in one named embedding space.

An embedding is only comparable with embeddings of the same space, and an InfU projection only works on
the space it was trained on. The released InfU checkpoints were trained on ``arcface_ir_se50``: facexlib's
ArcFace IR-SE50 on the BGR crop that insightface's ``norm_crop`` aligns, scaled to [-1, 1]. ``glintr100``
is the insightface pack's own recognizer and ``dlib`` the embedded profile's 128-D descriptor.

``load_recognizer(FaceConfig(...))`` needs no detector; the face analyzers embed through it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from infu.face.config import EmbeddingSpace, FaceConfig

EMBEDDING_DIMS: dict[str, int] = {"arcface_ir_se50": 512, "glintr100": 512, "dlib": 128}
"""Embedding size of each space."""
RELEASE_EMBEDDING_SPACE = "arcface_ir_se50"
"""The space the released InfU projection weights expect."""
RECOGNIZER_BATCH = 32
"""Aligned crops per recognizer run (unless the model fixes its batch size)."""

FaceCrop = tuple[np.ndarray, np.ndarray]
"""One face to embed: the HxWx3 uint8 RGB image holding it and its (5, 2) keypoints."""


class FaceModelsError(FileNotFoundError):
    """Configured face model files are missing or incomplete."""


class Recognizer(ABC):
    """Embeds faces given by keypoints into :attr:`embedding_space`; embeddings are L2-normalised float32."""

    embedding_space: ClassVar[EmbeddingSpace]
    embedding_dim: int

    @abstractmethod
    def embed_faces(self, faces: Sequence[FaceCrop]) -> np.ndarray:
        """(N, D) embeddings of N (RGB image, keypoints) pairs, batched; an image may hold several."""

    def embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """(D,) embedding of the face with keypoints ``kps`` in the RGB image ``rgb``."""
        return self.embed_faces([(rgb, kps)])[0]

    def run_in_batches(
        self, crops: list[np.ndarray], batch_size: int, run: Callable[[list[np.ndarray]], np.ndarray]
    ) -> np.ndarray:
        """(N, D) float32 outputs of ``run`` on ``crops``, ``batch_size`` crops per call."""
        if not crops:
            return np.empty((0, self.embedding_dim), dtype=np.float32)
        chunks = [run(crops[start : start + batch_size]) for start in range(0, len(crops), batch_size)]
        return np.concatenate(chunks).astype(np.float32)


def arcface_bgr_crops(faces: Sequence[FaceCrop], size: int = 112) -> list[np.ndarray]:
    """The BGR ``size`` x ``size`` crops insightface's ``norm_crop`` cuts from the BGR images.

    ``norm_crop`` is used rather than :func:`infu.face.align.align_face`, whose float64 template moves
    some pixels by one level. Warping the RGB image and reversing the crop's channels is the same
    per-channel warp, without converting whole images.
    """
    from insightface.utils.face_align import norm_crop  # imported by the recognizers that crop only

    return [
        np.ascontiguousarray(norm_crop(np.ascontiguousarray(rgb), np.asarray(kps), size)[:, :, ::-1])
        for rgb, kps in faces
    ]


def load_recognizer(config: FaceConfig) -> Recognizer:
    """The configured ``face.recognizer`` with its model loaded (only its libraries are imported)."""
    if config.recognizer == "arcface_ir_se50":
        from infu.face.arcface_ir_se50 import ArcFaceIRSE50Recognizer

        return ArcFaceIRSE50Recognizer(config)
    if config.recognizer == "glintr100":
        from infu.face.insightface_backend import PackRecognizer

        return PackRecognizer.from_pack(config)
    from infu.face.dlib_backend import DlibRecognizer

    return DlibRecognizer(config)


SAME_IDENTITY_SIMILARITY = {"dlib": 0.92, "arcface_ir_se50": 0.4, "glintr100": 0.4}
"""Default cosine similarity at or above which two faces are taken for one person, per embedding space.

dlib: its documented rule is euclidean distance < 0.6 between *raw* descriptors, whose norms measure
1.35-1.6 (about 1.5); on normalised descriptors that is ``cos > 1 - 0.6**2 / (2 * 1.5**2) = 0.92``.
Normalised dlib descriptors of different people are far from orthogonal: 0.78-0.93 on the sample corpus
and LFW photos, same person 0.96-1.0 (see tests/test_identity.py). ArcFace (IR-SE50, antelopev2's
glintr100): different people sit near 0, the same person typically above 0.4."""
