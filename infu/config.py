"""Typed run configuration, loaded from YAML.

One file describes a whole run: the run-level settings (where outputs go, which Ray cluster) and one
section per step. Unknown keys are rejected and every error names the offending key and value. The
hash of a step's section (execution resources excluded) identifies that step's output.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infu.face.config import FaceConfig
from infu.model.config import ModelConfig
from infu.paths import ResolvedPath
from infu.quality.config import QualityConfig


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and value at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Section):
    """How a step runs on Ray; never part of a step's config hash."""

    concurrency: int = Field(2, ge=1, description="parallel workers (Ray actors) for the step")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per worker")
    batch_size: int = Field(32, ge=1, description="samples handed to a worker's process_batch at once")


class RunSettings(_Section):
    """Run-level settings: where outputs go and which cluster runs the jobs."""

    name: str = Field("embedded", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    profile: Literal["embedded", "production"] = "embedded"
    run_dir: ResolvedPath = Path("runs/embedded")
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address (http://host:8265) to submit jobs to; null = a local Ray "
        "started by the flow",
    )
    job_timeout_s: float = Field(6 * 3600, gt=0, description="a step's Ray job fails after this long")
    python: str | None = Field(
        None, description="interpreter that runs step jobs; null = this one locally, `python` on a cluster"
    )


class SourceConfig(_Section):
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


class IngestConfig(_Section):
    """Source -> raw shards (the first half of the SPSS data path)."""

    source: SourceConfig
    shard_size: int = Field(1000, ge=1, le=100_000, description="samples per output shard")
    min_side: int = Field(64, ge=1, description="images whose shorter side is below this are rejected")
    max_pixels: int = Field(64 * 1024 * 1024, gt=0, description="decompression-bomb guard")
    resources: Resources = Resources()


class FilterThresholds(_Section):
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
        "identity clusters); null = the face backend's default (dlib 0.92, ArcFace 0.4)",
    )


class BucketConfig(_Section):
    """NovelAI-style aspect-ratio buckets."""

    resolution: int = Field(1024, ge=64)
    min_side: int = Field(256, ge=64)
    max_side: int = Field(2048, ge=64)
    step: int = Field(64, ge=8)


class FilterConfig(_Section):
    """Raw shards -> SPSS training shards (kept samples) + a decision for every input sample."""

    input: ResolvedPath | None = Field(None, description="raw shards folder; null = this run's ingest output")
    held_out_identities: ResolvedPath | None = Field(
        None, description="folder of <identity name>/<photos>: these people are removed from the data"
    )
    thresholds: FilterThresholds = FilterThresholds()
    buckets: BucketConfig = BucketConfig()
    max_pixels: int = Field(64 * 1024 * 1024, gt=0)
    resources: Resources = Resources()


class AdamWConfig(_Section):
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)


class TimestepSampling(_Section):
    """Conditional flow matching timesteps: t = sigmoid(N(mean, std))."""

    kind: Literal["logit_normal", "uniform"] = "logit_normal"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class TrainStage(_Section):
    learning_rate: float = Field(..., gt=0)
    batch_size: int = Field(..., ge=1, description="global batch size")
    max_steps: int = Field(..., ge=1)


class TrainingConfig(_Section):
    """InfuseNet + projection training: stage 1 pretraining on SPSS, stage 2 SFT on SPMS."""

    stage1: TrainStage
    stage2: TrainStage
    optimizer: AdamWConfig = AdamWConfig()
    timesteps: TimestepSampling = TimestepSampling()
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    resources: Resources = Resources()


STEP_DEPENDENCIES = {"filter": ("face", "quality"), "training": ("face", "model")}
"""Shared sections whose settings change a step's output (and so its config hash)."""


class InfuConfig(_Section):
    """A whole run."""

    run: RunSettings = RunSettings()
    face: FaceConfig = FaceConfig()
    model: ModelConfig = ModelConfig()
    quality: QualityConfig = QualityConfig()
    ingest: IngestConfig | None = None
    filter: FilterConfig | None = None
    training: TrainingConfig | None = None

    def step(self, name: str) -> BaseModel:
        """The section of step ``name``; a clear error when the file has none."""
        section = getattr(self, name, None)
        if not isinstance(section, BaseModel):
            raise ConfigError(f"this config has no `{name}:` section, which the {name} step needs")
        return section

    def step_hash(self, name: str) -> str:
        """Hash of what determines a step's output: its section (minus resources) and its dependencies."""
        section = self.step(name).model_dump(mode="json", exclude={"resources"})
        payload = {"step": name, "section": section}
        for shared in STEP_DEPENDENCIES.get(name, ()):
            payload[shared] = getattr(self, shared).model_dump(mode="json")
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def step_dir(self, name: str) -> Path:
        return self.run.run_dir / name


def _describe(errors: list[dict[str, Any]]) -> str:
    lines = []
    for error in errors:
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {error['input']!r})")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: `{part}` is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["ingest.shard_size=8", "run.run_dir=/tmp/x"]`` -> (key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> InfuConfig:
    try:
        return InfuConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid config {origin}:\n{_describe(error.errors())}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> InfuConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return config_from_dict(data, str(path))


def load_config_or_exit(path: str | Path, overrides: list[str] | None = None) -> InfuConfig:
    """:func:`load_config` for command lines: a bad config prints its error and exits with status 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None


def dump_config(config: InfuConfig) -> str:
    """The effective config as YAML (what a job actually ran with)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
