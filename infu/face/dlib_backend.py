"""Embedded face backend: dlib's HOG detector, 68-landmark predictor and 128-D ResNet descriptor.

The weights are the real ones the ``face-recognition-models`` wheel ships. That package is located
without being imported: importing it needs ``pkg_resources``, which current setuptools no longer has.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import dlib
import numpy as np

from infu.face.base import Face, FaceAnalyzer, l2_normalize
from infu.face.config import FaceConfig
from infu.face.pose import five_keypoints, head_pose
from infu.paths import package_file

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_dir() -> Path:
    """The ``models`` folder of the installed face-recognition-models package."""
    folder = package_file("face_recognition_models", "models")
    missing = [name for name in (PREDICTOR_FILE, DESCRIPTOR_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"face-recognition-models at {folder} lacks {', '.join(missing)}")
    return folder


class DlibFaceAnalyzer(FaceAnalyzer):
    """HOG detection (``upsample`` passes), 68 landmarks -> 5 keypoints and pose, ResNet descriptor."""

    backend = "dlib"
    embedding_dim = 128

    def __init__(self, config: FaceConfig):
        super().__init__(config)
        models = dlib_model_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(models / PREDICTOR_FILE))
        self._encoder = dlib.face_recognition_model_v1(str(models / DESCRIPTOR_FILE))

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
        descriptors = self._encoder.compute_face_descriptor(rgb, shapes, self.config.num_jitters)
        image_size = (rgb.shape[1], rgb.shape[0])
        faces = []
        for box, score, shape, descriptor in zip(boxes, scores, shapes, descriptors, strict=True):
            landmarks = np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float32)
            faces.append(
                Face(
                    bbox=np.array([box.left(), box.top(), box.right(), box.bottom()], dtype=np.float32),
                    score=float(score),
                    kps=five_keypoints(landmarks),
                    embedding=l2_normalize(np.asarray(descriptor)),
                    pose=head_pose(landmarks, image_size),
                )
            )
        return faces
