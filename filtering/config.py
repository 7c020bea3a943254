"""Config sections of the SPSS data path steps (``ingest:`` and ``filter:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infu.config import Resources, Section
from infu.paths import ResolvedPath


class SourceConfig(Section):
    """Where raw images come from."""

    kind: Literal[
        "folder",
        "webdataset",
        "sample_corpus",
        "vggface2",
        "millioncelebs",
        "celeba",
        "celebv_hq",
        "celebv_text",
        "vfhq",
        "ffhq",
        "easyportrait",
        "cosmicman_hq",
    ] = Field(..., description="source layout; dataset layouts are documented in docs/datasets.md")
    path: ResolvedPath
    dataset: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="dataset name recorded per sample"
    )
    captions: ResolvedPath | None = Field(
        None, description='folder sources: a JSONL file of {"path", "caption"} (the `original` caption)'
    )
    extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"],
        description="file endings read as images; other files are counted in the manifest as ignored",
    )
    symlinks: Literal["inside", "never", "follow"] = Field(
        "inside",
        description="symlinks in the source folder: followed when their target is inside the source root "
        "(inside), never, or wherever they point (follow); the others and loops become rejected records",
    )


class IngestConfig(Section):
    """Source -> raw shards (the first half of the SPSS data path)."""

    source: SourceConfig
    shard_size: int = Field(1000, ge=1, le=100_000, description="samples per output shard")
    min_side: int = Field(64, ge=1, description="images whose shorter side is below this are rejected")
    max_pixels: int = Field(64 * 1024 * 1024, gt=0, description="decompression-bomb guard")
    resources: Resources = Resources()


class FilterThresholds(Section):
    """Decision rules of the SPSS filter. Every score is stored, so these can change without recomputing."""

    min_side: int = Field(256, ge=1, description="image shorter side below this -> too_small")
    second_face_ratio: float = Field(
        0.2, gt=0, le=1, description="a second face with at least this fraction of the largest's area"
    )
    min_face_px: int = Field(64, ge=1, description="largest face's shorter bbox side below this")
    min_face_area_ratio: float = Field(0.01, ge=0, le=1, description="face bbox area / image area")
    min_detection_score: float | None = Field(None, description="detector score (backend-specific scale)")
    max_abs_yaw: float = Field(60.0, gt=0)
    max_abs_pitch: float = Field(45.0, gt=0)
    min_face_sharpness: float = Field(20.0, ge=0, description="Laplacian variance of the face crop")
    max_watermark: float = Field(0.5, ge=0, le=1)
    max_nsfw: float = Field(0.5, ge=0, le=1)
    min_aesthetic: float | None = Field(None, description="LAION aesthetic score (1..10); null = off")
    max_aspect_error: float = Field(0.25, gt=0, description="|log(image ratio / bucket ratio)|")
    max_phash_distance: int = Field(4, ge=0, le=16, description="near duplicates: pHash Hamming distance")
    same_identity_similarity: float | None = Field(
        None,
        gt=-1,
        lt=1,
        description="face-embedding cosine at or above which two faces are one person (held-out identities, "
        "identity clusters); null = the recognizer's default (dlib 0.92, ArcFace 0.4)",
    )


class BucketConfig(Section):
    """NovelAI-style aspect-ratio buckets."""

    resolution: int = Field(1024, ge=64)
    min_side: int = Field(256, ge=64)
    max_side: int = Field(2048, ge=64)
    step: int = Field(64, ge=8)


class FilterConfig(Section):
    """Raw shards -> SPSS training shards (kept samples) + a decision for every input sample."""

    input: ResolvedPath | None = Field(None, description="raw shards folder; null = this run's ingest output")
    held_out_identities: ResolvedPath | None = Field(
        None, description="folder of <identity name>/<photos>: these people are removed from the data"
    )
    thresholds: FilterThresholds = FilterThresholds()
    buckets: BucketConfig = BucketConfig()
    max_pixels: int = Field(64 * 1024 * 1024, gt=0)
    resources: Resources = Resources()
