"""Face analysis as a ``ray.data`` ``map_batches`` callable class (models loaded once per worker).

ds.map_batches(FaceBatchAnnotator, fn_constructor_kwargs={"config": face_config},
               batch_size=32, concurrency=2, **FaceBatchAnnotator.resources(face_config))
"""

from __future__ import annotations

import numpy as np

from infu.face.base import BadImageError, Face, largest_face
from infu.face.config import FaceConfig
from infu.face.providers import CUDA

FACE_COUNT = "face_count"
FACE_BOXES = "face_boxes"
FACE_SCORES = "face_scores"
FACE_KPS = "face_kps"
FACE_POSE = "face_pose"
FACE_LARGEST = "face_largest"
FACE_EMBEDDING = "face_embedding"
FACE_ERROR = "face_error"


def _ragged(rows: list[np.ndarray]) -> np.ndarray:
    """A 1-D object column holding one array per row (Ray stores it as a variable-shaped tensor)."""
    column = np.empty(len(rows), dtype=object)
    column[:] = rows
    return column


def _pose_array(face: Face) -> list[float]:
    return list(face.pose) if face.pose is not None else [np.nan] * 3


class FaceBatchAnnotator:
    """Adds face columns to a batch holding a column of encoded image bytes.

    Per row: ``face_count``; ``face_boxes`` (N, 4), ``face_scores`` (N,), ``face_kps`` (N, 5, 2) and
    ``face_pose`` (N, 3: yaw, pitch, roll; NaN without a pose model) for every face; ``face_largest``,
    the index of the largest face (-1 when none); ``face_embedding``, its (D,) embedding (zeros when
    none); ``face_error``, the :class:`BadImageError` reason of an unusable image ("" otherwise).
    """

    def __init__(self, config: FaceConfig, image_column: str = "image"):
        from infu.face import load_face_analyzer

        self.analyzer = load_face_analyzer(config)
        self.image_column = image_column

    @staticmethod
    def resources(config: FaceConfig) -> dict[str, float]:
        """Ray resources of one worker: a GPU when CUDA is asked for and a model of the stack can use it
        (the insightface ONNX models, the torch IR-SE50 recognizer), else one CPU."""
        on_gpu = False
        if CUDA in config.providers:
            import onnxruntime
            import torch

            onnx_gpu = config.backend == "insightface" and CUDA in onnxruntime.get_available_providers()
            torch_gpu = config.recognizer == "arcface_ir_se50" and torch.cuda.is_available()
            on_gpu = onnx_gpu or torch_gpu
        return {"num_cpus": 1.0, "num_gpus": 1.0 if on_gpu else 0.0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.analyzer.analyze_batch(list(batch[self.image_column]))
        dim = self.analyzer.embedding_dim
        counts, largest, errors = [], [], []
        boxes, scores, kps, poses = [], [], [], []
        embeddings = np.zeros((len(results), dim), dtype=np.float32)
        for row, result in enumerate(results):
            faces = [] if isinstance(result, BadImageError) else result
            errors.append(result.reason if isinstance(result, BadImageError) else "")
            counts.append(len(faces))
            boxes.append(np.array([face.bbox for face in faces], dtype=np.float32).reshape(-1, 4))
            scores.append(np.array([face.score for face in faces], dtype=np.float32))
            kps.append(np.array([face.kps for face in faces], dtype=np.float32).reshape(-1, 5, 2))
            poses.append(np.array([_pose_array(face) for face in faces], dtype=np.float32).reshape(-1, 3))
            best = largest_face(faces)
            largest.append(-1 if best is None else faces.index(best))
            if best is not None:
                embeddings[row] = best.embedding
        return {
            **batch,
            FACE_COUNT: np.array(counts, dtype=np.int32),
            FACE_BOXES: _ragged(boxes),
            FACE_SCORES: _ragged(scores),
            FACE_KPS: _ragged(kps),
            FACE_POSE: _ragged(poses),
            FACE_LARGEST: np.array(largest, dtype=np.int32),
            FACE_EMBEDDING: embeddings,
            FACE_ERROR: np.array(errors, dtype=object),
        }
