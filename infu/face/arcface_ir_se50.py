"""facexlib's ArcFace IR-SE50, the identity embedder the released InfU projection weights were trained on.

As the release applies it: the face's BGR crop aligned by insightface's ``norm_crop`` (112x112), pixels
scaled to [-1, 1] (x / 255 * 2 - 1), channels kept in BGR order, NCHW float32; the 512-D output is
L2-normalised. The weights (``recognition_arcface_ir_se50.pth``) are read from ``face.recognizer_weights``
and never downloaded.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from facexlib.recognition.arcface_arch import Backbone

from infu.face.base import normalize_rows
from infu.face.config import FaceConfig
from infu.face.providers import CUDA, gpu_missing, torch_gpu_problem
from infu.face.recognizer import (
    RECOGNIZER_BATCH,
    FaceCrop,
    FaceModelsError,
    Recognizer,
    arcface_bgr_crops,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "recognition_arcface_ir_se50.pth"
CROP_SIZE = 112


def ir_se50() -> Backbone:
    """The IR-SE50 architecture exactly as facexlib builds it for its ArcFace weights (random init)."""
    return Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")


def load_ir_se50(path: Path) -> Backbone:
    """IR-SE50 in eval mode with the state dict in ``path`` loaded strictly (every key, nothing extra)."""
    if not path.is_file():
        raise FaceModelsError(
            f"face.recognizer_weights {path} is not a file: recognizer arcface_ir_se50 needs facexlib's "
            f"{WEIGHTS_FILE} there (it is never downloaded)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path} (face.recognizer_weights) is not a readable torch file: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} (face.recognizer_weights) holds a {type(state).__name__}, not a state dict")
    model = ir_se50()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path} (face.recognizer_weights) is not an IR-SE50 ArcFace state dict: {error}"
        ) from None
    return model.eval()


def torch_device(config: FaceConfig) -> torch.device:
    """CUDA when ``face.providers`` asks for it and torch has it, else the CPU (said loudly, or an error
    with ``face.require_gpu``, when CUDA was asked for)."""
    if CUDA not in config.providers:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpu_missing("the arcface_ir_se50 recognizer (torch)", torch_gpu_problem(), config.require_gpu)
    return torch.device("cpu")


class ArcFaceIRSE50Recognizer(Recognizer):
    """facexlib's IR-SE50 ArcFace on ``norm_crop`` BGR crops in [-1, 1]: the release's embedding space."""

    embedding_space = "arcface_ir_se50"
    embedding_dim = 512

    def __init__(self, config: FaceConfig):
        if config.recognizer_weights is None:
            raise FaceModelsError(
                "face.recognizer_weights is not set: recognizer arcface_ir_se50 reads facexlib's "
                f"{WEIGHTS_FILE} from it (the file the released InfU checkpoints expect; never downloaded)"
            )
        self.device = torch_device(config)
        self.model = load_ir_se50(Path(config.recognizer_weights)).to(self.device)
        logger.info("arcface_ir_se50 recognizer %s on %s", config.recognizer_weights, self.device)

    def embed_faces(self, faces: Sequence[FaceCrop]) -> np.ndarray:
        crops = arcface_bgr_crops(faces, CROP_SIZE)
        return normalize_rows(self.run_in_batches(crops, RECOGNIZER_BATCH, self._forward))

    @torch.inference_mode()
    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        """Raw outputs for BGR uint8 crops: NCHW float32 in [-1, 1] through the network."""
        pixels = torch.from_numpy(np.stack(crops))
        batch = (pixels.permute(0, 3, 1, 2).contiguous().float() / 255 * 2 - 1).to(self.device)
        return self.model(batch).float().cpu().numpy()
