"""Face stack settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infu.paths import ResolvedPath

EmbeddingSpace = Literal["arcface_ir_se50", "glintr100", "dlib"]
"""The recognizers, each its own embedding space (see :mod:`infu.face.recognizer`)."""


class FaceConfig(BaseModel):
    """Which face backend to use and how. ``dlib`` is the embedded one, ``insightface`` production."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["dlib", "insightface"] = "dlib"
    # dlib (embedded): HOG detector, 68 landmarks, 128-D ResNet descriptor from face-recognition-models.
    upsample: int = Field(1, ge=0, le=3, description="HOG detector upsampling passes (finds smaller faces)")
    num_jitters: int = Field(1, ge=1, description="dlib descriptor re-sampling count")
    detect_max_side: int | None = Field(
        1024, ge=64, description="dlib: HOG detection runs on the image downscaled to this longer side"
    )
    # insightface (production): a model pack folder such as <root>/models/antelopev2, never downloaded.
    model_root: ResolvedPath | None = Field(
        None, description="insightface root holding models/<pack_name>/*.onnx"
    )
    pack_name: str = "antelopev2"
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime providers in order of preference; unavailable ones are skipped",
    )
    det_sizes: list[int] = Field(default_factory=lambda: [640, 320, 160], min_length=1)
    det_threshold: float = Field(0.5, gt=0, lt=1)
    onnx_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session; 0 = all cores")
    max_pixels: int = Field(64 * 1024 * 1024, gt=0)
    # identity embedding: which recognizer, hence which embedding space (see infu.face.recognizer)
    recognizer: EmbeddingSpace | None = Field(
        None,
        description="identity embedder: arcface_ir_se50 (what the released InfU checkpoints were trained "
        "on), glintr100 (the insightface pack's) or dlib; default: dlib for the dlib backend, "
        "arcface_ir_se50 for insightface",
    )
    recognizer_weights: ResolvedPath | None = Field(
        None,
        description="arcface_ir_se50: the recognition_arcface_ir_se50.pth file (local, never downloaded)",
    )
    require_gpu: bool = Field(
        False, description="fail, instead of warning loudly, when CUDA is asked for and only CPU is there"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_recognizer(cls, data: Any) -> Any:
        """An unset ``recognizer`` is ``dlib`` for the dlib backend and ``arcface_ir_se50`` for insightface.

        Whether the recognizer's files are there (``recognizer_weights``, the pack) is checked when it loads.
        """
        if isinstance(data, dict) and data.get("recognizer") is None:
            backend = data.get("backend", "dlib")
            return {**data, "recognizer": "dlib" if backend == "dlib" else "arcface_ir_se50"}
        return data

    @model_validator(mode="after")
    def _recognizer_fits_backend(self) -> FaceConfig:
        if self.backend == "insightface" and self.recognizer == "dlib":
            raise ValueError(
                "face.recognizer dlib describes the 68 landmarks dlib fits in its own detector's boxes; "
                "with backend insightface use arcface_ir_se50 (what the released InfU checkpoints expect) "
                "or glintr100"
            )
        return self
