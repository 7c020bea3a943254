"""Production face backend: an insightface model pack (e.g. antelopev2: SCRFD-10G, glintr100 ArcFace, 1k3d68).

The pack is loaded by ``insightface.app.FaceAnalysis`` from a local folder, so its model_zoo routes every
``*.onnx`` by its input/output signature exactly as for the official packs; nothing is ever downloaded.
Detection retries at each of ``det_sizes`` (640 -> 320 -> 160) until a face is found, as the InfU pipeline
does; embeddings of all faces of a batch go through the configured recognizer together. The pack's own
recognizer is the ``glintr100`` one (:class:`PackRecognizer`), loadable without the rest of the pack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from insightface.app import FaceAnalysis
from insightface.app.common import Face as InsightFace
from insightface.model_zoo import model_zoo
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.package_manifest import has_model_package_manifest, load_model_package

from infu.face.base import BadImageError, BatchResult, Face, FaceAnalyzer, HeadPose, normalize_rows
from infu.face.config import FaceConfig
from infu.face.pose import head_pose
from infu.face.providers import check_session_providers, select_providers
from infu.face.recognizer import (
    RECOGNIZER_BATCH,
    FaceCrop,
    FaceModelsError,
    Recognizer,
    arcface_bgr_crops,
    load_recognizer,
)
from infu.images import ImageInput

logger = logging.getLogger(__name__)

DETECTION, RECOGNITION, LANDMARKS = "detection", "recognition", "landmark_3d_68"


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


def session_options(config: FaceConfig) -> onnxruntime.SessionOptions:
    """onnxruntime session options: ``onnx_threads`` intra-op threads when set."""
    options = onnxruntime.SessionOptions()
    if config.onnx_threads:
        options.intra_op_num_threads = config.onnx_threads
    return options


class PackRecognizer(Recognizer):
    """The pack's ArcFace-like ONNX recognizer (glintr100 in antelopev2) on ``norm_crop`` BGR crops."""

    embedding_space = "glintr100"

    def __init__(self, model: ArcFaceONNX):
        self.model = model
        self.embedding_dim = int(model.output_shape[-1])
        batch_axis = model.input_shape[0]
        self._batch = batch_axis if isinstance(batch_axis, int) and batch_axis > 0 else RECOGNIZER_BATCH

    @classmethod
    def from_pack(cls, config: FaceConfig) -> PackRecognizer:
        """The recognizer of the configured pack alone: the first model (by file name) routed to recognition,
        as ``FaceAnalysis`` picks it; no detector is loaded."""
        folder = pack_dir(config)
        providers = select_providers(config.providers, config.require_gpu)
        kwargs = {"providers": providers, "sess_options": session_options(config)}
        if has_model_package_manifest(folder):
            package = load_model_package(folder)
            found = RECOGNITION in package.tasks
            model = model_zoo.get_model(str(folder), model_task=RECOGNITION, **kwargs) if found else None
        else:
            routed = (model_zoo.get_model(str(path), **kwargs) for path in sorted(folder.glob("*.onnx")))
            model = next((model for model in routed if getattr(model, "taskname", None) == RECOGNITION), None)
        if model is None:
            raise FaceModelsError(f"no face recognition model (ArcFace-like, 1x3x112x112 input) in {folder}")
        used = model.session.get_providers()
        check_session_providers(f"the face recognizer in {folder}", used, providers, config.require_gpu)
        return cls(model)

    def embed_faces(self, faces: Sequence[FaceCrop]) -> np.ndarray:
        crops = arcface_bgr_crops(faces, self.model.input_size[0])
        return normalize_rows(self.run_in_batches(crops, self._batch, self.model.get_feat))


class InsightFaceAnalyzer(FaceAnalyzer):
    """SCRFD detection with size retries, the configured recognizer, pose from the 68 3D landmarks if any."""

    backend = "insightface"

    def __init__(self, config: FaceConfig):
        super().__init__(config)
        folder = pack_dir(config)
        self.providers = select_providers(config.providers, config.require_gpu)
        pack_recognizer = config.recognizer == "glintr100"
        try:
            app = FaceAnalysis(
                name=str(folder),
                allowed_modules=[DETECTION, LANDMARKS] + ([RECOGNITION] if pack_recognizer else []),
                providers=self.providers,
                sess_options=session_options(config),
            )
        except (AssertionError, KeyError) as error:
            raise FaceModelsError(f"no face detection model (SCRFD: >= 5 outputs) in {folder}") from error
        if not app.models[DETECTION].use_kps:
            raise FaceModelsError(f"the face detector in {folder} has no keypoint outputs (needs 9 or 15)")
        if pack_recognizer and RECOGNITION not in app.models:
            raise FaceModelsError(f"no face recognition model (ArcFace-like, 1x3x112x112 input) in {folder}")
        app.prepare(ctx_id=0, det_thresh=config.det_threshold, det_size=(config.det_sizes[0],) * 2)
        used = app.models[DETECTION].session.get_providers()
        check_session_providers(f"the face detector in {folder}", used, self.providers, config.require_gpu)
        self.folder = folder
        self.models: dict[str, object] = dict(app.models)
        """insightface model objects by task (``detection``, ``recognition``, ``landmark_3d_68``)."""
        self._detector = app.models[DETECTION]
        self._landmarks = app.models.get(LANDMARKS)
        self.recognizer = (
            PackRecognizer(app.models[RECOGNITION]) if pack_recognizer else load_recognizer(config)
        )
        logger.info(
            "insightface pack %s: %s on %s, embeddings %s",
            folder,
            sorted(app.models),
            self.providers,
            self.embedding_space,
        )

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

    def _analyze_many(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        detections = []
        faces: list[FaceCrop] = []
        for rgb in rgbs:
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            boxes, kpss = self.detect(bgr)
            found = [(box, kps, self._pose(bgr, box, kps)) for box, kps in zip(boxes, kpss, strict=True)]
            detections.append(found)
            faces.extend((rgb, kps) for kps in kpss)
        embeddings = iter(self.recognizer.embed_faces(faces))
        return [
            [
                Face(
                    bbox=box[:4].astype(np.float32),
                    score=float(box[4]),
                    kps=kps.astype(np.float32),
                    embedding=next(embeddings),
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
