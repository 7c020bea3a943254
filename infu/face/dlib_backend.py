"""Embedded face backend: dlib's HOG detector, 68-landmark predictor and 128-D ResNet descriptor.

The weights are the real ones the ``face-recognition-models`` wheel ships. That package is located
without being imported: importing it needs ``pkg_resources``, which current setuptools no longer has.
The descriptor is also the ``dlib`` recognizer, and the detector can feed any other recognizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import dlib
import numpy as np

from infu.face.align import alignment_matrix
from infu.face.base import Face, FaceAnalyzer, l2_normalize
from infu.face.config import FaceConfig
from infu.face.pose import five_keypoints, head_pose
from infu.face.recognizer import FaceCrop, Recognizer, load_recognizer
from infu.paths import package_file

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
TEMPLATE_BOX_CENTRE = np.array([56.0, 68.0])
TEMPLATE_BOX_SIDE = 86.0
"""Where dlib's HOG detector puts its square box, in the 112x112 ArcFace template frame: the median over
the faces it finds in ../shared/data/faces and insightface's sample photos."""


def dlib_model_dir() -> Path:
    """The ``models`` folder of the installed face-recognition-models package."""
    folder = package_file("face_recognition_models", "models")
    missing = [name for name in (PREDICTOR_FILE, DESCRIPTOR_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"face-recognition-models at {folder} lacks {', '.join(missing)}")
    return folder


def box_from_keypoints(kps: np.ndarray) -> dlib.rectangle:
    """The box dlib's detector would give the face with these 5 keypoints (to fit its 68 landmarks in)."""
    matrix = alignment_matrix(kps)  # image -> template frame
    linear, shift = matrix[:, :2], matrix[:, 2]
    centre = np.linalg.solve(linear, TEMPLATE_BOX_CENTRE - shift)
    half = TEMPLATE_BOX_SIDE / np.sqrt(abs(np.linalg.det(linear))) / 2
    left, top = np.round(centre - half).astype(int)
    right, bottom = np.round(centre + half).astype(int)
    return dlib.rectangle(int(left), int(top), int(right), int(bottom))


class DlibRecognizer(Recognizer):
    """dlib's 128-D ResNet descriptor of a face's 68-landmark shape (``num_jitters`` re-samplings)."""

    embedding_space = "dlib"
    embedding_dim = 128

    def __init__(self, config: FaceConfig, predictor: dlib.shape_predictor | None = None):
        models = dlib_model_dir()
        self.num_jitters = config.num_jitters
        self.predictor = predictor or dlib.shape_predictor(str(models / PREDICTOR_FILE))
        self._encoder = dlib.face_recognition_model_v1(str(models / DESCRIPTOR_FILE))

    def embed_shapes(self, rgb: np.ndarray, shapes: dlib.full_object_detections) -> np.ndarray:
        """(N, 128) descriptors of 68-landmark shapes fitted in the contiguous RGB array ``rgb``."""
        descriptors = self._encoder.compute_face_descriptor(rgb, shapes, self.num_jitters)
        return np.stack([l2_normalize(np.asarray(descriptor)) for descriptor in descriptors])

    def embed_faces(self, faces: Sequence[FaceCrop]) -> np.ndarray:
        """The 68 landmarks are fitted in :func:`box_from_keypoints` of each face's keypoints."""
        embeddings = []
        for rgb, kps in faces:
            rgb = np.ascontiguousarray(rgb)
            shape = self.predictor(rgb, box_from_keypoints(kps))
            embeddings.append(self.embed_shapes(rgb, dlib.full_object_detections([shape]))[0])
        return np.array(embeddings, dtype=np.float32).reshape(len(faces), self.embedding_dim)


class DlibFaceAnalyzer(FaceAnalyzer):
    """HOG detection (``upsample`` passes), 68 landmarks -> 5 keypoints and pose, configured recognizer.

    The ``dlib`` recognizer describes the landmark shapes fitted in the detector's boxes.
    """

    backend = "dlib"

    def __init__(self, config: FaceConfig):
        super().__init__(config)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_model_dir() / PREDICTOR_FILE))
        self.recognizer = (
            DlibRecognizer(config, self._predictor)
            if config.recognizer == "dlib"
            else load_recognizer(config)
        )

    def _detect(self, rgb: np.ndarray) -> tuple[list[dlib.rectangle], list[float]]:
        """HOG boxes in full-resolution pixels; big images are searched at ``detect_max_side``."""
        height, width = rgb.shape[:2]
        limit = self.config.detect_max_side
        scale = min(1.0, limit / max(height, width)) if limit else 1.0
        searched = rgb
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            searched = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(searched, self.config.upsample, 0.0)
        boxes = [
            dlib.rectangle(
                round(rect.left() / scale),
                round(rect.top() / scale),
                round(rect.right() / scale),
                round(rect.bottom() / scale),
            )
            for rect in rects
        ]
        return boxes, list(scores)

    def analyze_rgb(self, rgb: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(rgb)
        boxes, scores = self._detect(rgb)
        if not boxes:
            return []
        shapes = dlib.full_object_detections([self._predictor(rgb, box) for box in boxes])
        landmarks = [
            np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float32) for shape in shapes
        ]
        kpss = [five_keypoints(points) for points in landmarks]
        if isinstance(self.recognizer, DlibRecognizer):
            embeddings = self.recognizer.embed_shapes(rgb, shapes)
        else:
            embeddings = self.recognizer.embed_faces([(rgb, kps) for kps in kpss])
        image_size = (rgb.shape[1], rgb.shape[0])
        return [
            Face(
                bbox=np.array([box.left(), box.top(), box.right(), box.bottom()], dtype=np.float32),
                score=float(score),
                kps=kps,
                embedding=embedding,
                pose=head_pose(points, image_size),
            )
            for box, score, points, kps, embedding in zip(
                boxes, scores, landmarks, kpss, embeddings, strict=True
            )
        ]
