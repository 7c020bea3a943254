"""Production face backend: an insightface model pack (e.g. antelopev2: SCRFD-10G, glintr100 ArcFace, 1k3d68).

The pack is loaded by ``insightface.app.FaceAnalysis`` from a local folder, so its model_zoo routes every
``*.onnx`` by its input/output signature exactly as for the official packs; nothing is ever downloaded.
Detection retries at each of ``det_sizes`` (640 -> 320 -> 160) until a face is found, as the InfU pipeline
does; embeddings of all faces of a batch go through the recognizer together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from insightface.app import FaceAnalysis
from insightface.app.common import Face as InsightFace
from insightface.model_zoo.package_manifest import has_model_package_manifest

from infu.face.align import align_face
from infu.face.base import BadImageError, BatchResult, Face, FaceAnalyzer, HeadPose, l2_normalize
from infu.face.config import FaceConfig
from infu.face.pose import head_pose
from infu.images import ImageInput

logger = logging.getLogger(__name__)

DETECTION, RECOGNITION, LANDMARKS = "detection", "recognition", "landmark_3d_68"
RECOGNIZER_BATCH = 32
"""Aligned crops per recognizer run when its batch axis is dynamic."""


class FaceModelsError(FileNotFoundError):
    """The configured insightface model pack is missing or incomplete."""


def pack_dir(config: FaceConfig) -> Path:
    """``<model_root>/models/<pack_name>`` (insightface's layout) or ``<model_root>/<pack_name>``."""
    if config.model_root is None:
        raise FaceModelsError(
            "face.model_root is not set: the insightface backend reads a model pack such as antelopev2 from "
            "<model_root>/models/<pack_name> and never downloads one"
        )
    root = Path(config.model_root).expanduser()
    candidates = [root / "models" / config.pack_name, root / config.pack_name]
    for folder in candidates:
        if folder.is_dir() and (any(folder.glob("*.onnx")) or has_model_package_manifest(folder)):
            return folder
    tried = ", ".join(str(folder) for folder in candidates)
    raise FaceModelsError(
        f"insightface model pack {config.pack_name!r} not found: none of {tried} holds *.onnx files "
        f"(put the unzipped {config.pack_name} models there; they are never downloaded)"
    )


def select_providers(requested: Sequence[str]) -> list[str]:
    """The requested onnxruntime providers that this onnxruntime offers, in the requested order."""
    available = onnxruntime.get_available_providers()
    selected = [name for name in requested if name in available]
    if not selected:
        raise RuntimeError(f"none of the face providers {list(requested)} is in onnxruntime's {available}")
    return selected


class InsightFaceAnalyzer(FaceAnalyzer):
    """SCRFD detection with size retries, ArcFace embedding, pose from the 68 3D landmarks when present."""

    backend = "insightface"

    def __init__(self, config: FaceConfig):
        super().__init__(config)
        folder = pack_dir(config)
        self.providers = select_providers(config.providers)
        options = onnxruntime.SessionOptions()
        if config.onnx_threads:
            options.intra_op_num_threads = config.onnx_threads
        try:
            app = FaceAnalysis(
                name=str(folder),
                allowed_modules=[DETECTION, RECOGNITION, LANDMARKS],
                providers=self.providers,
                sess_options=options,
            )
        except (AssertionError, KeyError) as error:
            raise FaceModelsError(f"no face detection model (SCRFD: >= 5 outputs) in {folder}") from error
        if not app.models[DETECTION].use_kps:
            raise FaceModelsError(f"the face detector in {folder} has no keypoint outputs (needs 9 or 15)")
        if RECOGNITION not in app.models:
            raise FaceModelsError(f"no face recognition model (ArcFace-like, 1x3x112x112 input) in {folder}")
        app.prepare(ctx_id=0, det_thresh=config.det_threshold, det_size=(config.det_sizes[0],) * 2)
        self.folder = folder
        self.models: dict[str, object] = dict(app.models)
        """insightface model objects by task (``detection``, ``recognition``, ``landmark_3d_68``)."""
        self._detector = app.models[DETECTION]
        self._recognizer = app.models[RECOGNITION]
        self._landmarks = app.models.get(LANDMARKS)
        self.embedding_dim = int(self._recognizer.output_shape[-1])
        batch_axis = self._recognizer.input_shape[0]
        fixed_batch = isinstance(batch_axis, int) and batch_axis > 0
        self._recognizer_batch = batch_axis if fixed_batch else RECOGNIZER_BATCH
        logger.info("insightface pack %s: %s on %s", folder, sorted(app.models), self.providers)

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 5) boxes+scores and (N, 5, 2) keypoints at the first of ``det_sizes`` that finds a face."""
        for size in self.config.det_sizes:
            boxes, kps = self._detector.detect(bgr, input_size=(size, size))
            if len(boxes):
                return boxes, kps
        return boxes, kps

    def _pose(self, bgr: np.ndarray, box: np.ndarray, kps: np.ndarray) -> HeadPose | None:
        if self._landmarks is None:
            return None
        face = InsightFace(bbox=box[:4], kps=kps, det_score=box[4])
        landmarks = self._landmarks.get(bgr, face)
        return head_pose(landmarks[:, :2], (bgr.shape[1], bgr.shape[0]))

    def _embed(self, bgr_crops: list[np.ndarray]) -> np.ndarray:
        """(N, D) embeddings of aligned BGR crops, ``_recognizer_batch`` per run."""
        if not bgr_crops:
            return np.empty((0, self.embedding_dim), dtype=np.float32)
        chunks = [
            self._recognizer.get_feat(bgr_crops[start : start + self._recognizer_batch])
            for start in range(0, len(bgr_crops), self._recognizer_batch)
        ]
        return np.concatenate(chunks).astype(np.float32)

    def _analyze_many(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        crop_size = self._recognizer.input_size[0]
        detections = []
        crops = []
        for rgb in rgbs:
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            boxes, kpss = self.detect(bgr)
            faces = [(box, kps, self._pose(bgr, box, kps)) for box, kps in zip(boxes, kpss, strict=True)]
            detections.append(faces)
            crops.extend(align_face(bgr, kps, crop_size) for kps in kpss)
        embeddings = iter(self._embed(crops))
        return [
            [
                Face(
                    bbox=box[:4].astype(np.float32),
                    score=float(box[4]),
                    kps=kps.astype(np.float32),
                    embedding=l2_normalize(next(embeddings)),
                    pose=pose,
                )
                for box, kps, pose in image_detections
            ]
            for image_detections in detections
        ]

    def analyze_rgb(self, rgb: np.ndarray) -> list[Face]:
        return self._analyze_many([rgb])[0]

    def analyze_batch(self, images: Sequence[ImageInput]) -> list[BatchResult]:
        """One recognizer pass for the faces of all the good images; bad images yield their error."""
        decoded: list[np.ndarray | BadImageError] = []
        for image in images:
            try:
                decoded.append(self.load(image))
            except BadImageError as error:
                decoded.append(error)
        good = [item for item in decoded if isinstance(item, np.ndarray)]
        analyzed = iter(self._analyze_many(good))
        return [item if isinstance(item, BadImageError) else next(analyzed) for item in decoded]
