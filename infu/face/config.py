"""Face stack settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from infu.paths import ResolvedPath


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
