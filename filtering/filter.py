"""The SPSS filter: raw shards -> single-person portrait shards, one decision per input sample.

Three resumable phases, each committing atomically:

1. **score** (one Ray Data pipeline): a CPU ``decode`` stage reads and decodes the original bytes, the
   ``score`` stage (models loaded once per worker, the step's GPUs) runs face analysis, face sharpness,
   CLIP-based quality heads, held-out identity match, aspect bucket, perceptual hash and the per-image
   decision. Records only (``filter/_scored/``).
2. **global** (a reduce phase, :mod:`filtering.global_phase`): exact (sha256) and near (pHash)
   duplicates among the images still kept, keeping the first in key order, and identity clusters per
   dataset -> ``filter/_global/decisions/<shard>.parquet``, partitioned by shard.
3. **write**: the final shards in ``filter/`` with the kept samples' original bytes and every input
   sample's record, kept or rejected, with all its scores; each shard reads only its own decisions.

The dataset's columns (``identity``, ``attributes``, captions) pass through unchanged; a face embedding
is stored with the recognizer's ``face_embedding_space``, which the manifest records too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from filtering.buckets import assign_bucket, make_buckets
from filtering.config import FilterConfig, FilterThresholds
from filtering.dedup import phash
from filtering.global_phase import compute_global_decisions
from filtering.identity import HeldOutIdentities
from infu.config import InfuConfig
from infu.face import SAME_IDENTITY_SIMILARITY, Face, FaceAnalyzer, FaceConfig, face_rows, load_face_analyzer
from infu.identities import identity_photos
from infu.images import extension_for_mime
from infu.index import DatasetIndex
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, summarize
from infu.quality.config import QualityConfig
from infu.records import RejectReason, Status, reject
from infu.runner import DecodeStage, Phase, Stage, StageOutput, run_phase, run_reduce, shard_tasks, stage
from infu.shards import InputImages, committed_shards, read_parquet_records, read_stats
from infu.steps import StepError

STEP = "filter"
SCORED = "_scored"
GLOBAL = "_global"


def face_sharpness(rgb: np.ndarray, face: Face, size: int = 128) -> float:
    """Variance of the Laplacian of the face crop, resized to ``size`` px wide (scale-independent blur)."""
    x1, y1, x2, y2 = (int(round(value)) for value in face.bbox)
    height, width = rgb.shape[:2]
    crop = rgb[max(0, y1) : min(height, y2), max(0, x1) : min(width, x2)]
    if crop.size == 0:
        return 0.0
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(gray, (size, max(1, round(size * gray.shape[0] / gray.shape[1]))))
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def face_scores(rgb: np.ndarray, faces: list[Face]) -> dict[str, float]:
    """Scores of the face part of the decision (all kept in the record)."""
    height, width = rgb.shape[:2]
    scores: dict[str, float] = {"face_count": float(len(faces))}
    if not faces:
        return scores
    ordered = sorted(faces, key=lambda face: face.area, reverse=True)
    largest = ordered[0]
    scores.update(
        face_px=float(min(largest.width, largest.height)),
        face_area_ratio=largest.area / float(width * height),
        second_face_ratio=ordered[1].area / largest.area if len(ordered) > 1 else 0.0,
        detection_score=float(largest.score),
        sharpness=face_sharpness(rgb, largest),
    )
    if largest.pose is not None:
        scores.update(yaw=largest.pose.yaw, pitch=largest.pose.pitch, roll=largest.pose.roll)
    return scores


def decide(scores: dict[str, float], rules: FilterThresholds) -> tuple[RejectReason, str] | None:
    """The per-image decision from stored scores: the first failing rule, or ``None`` (kept)."""
    if scores["min_side"] < rules.min_side:
        return RejectReason.TOO_SMALL, f"shorter side {scores['min_side']:.0f}"
    if scores["face_count"] == 0:
        return RejectReason.NO_FACE, "no face detected"
    checks: list[tuple[bool, RejectReason, str]] = [
        (
            scores["second_face_ratio"] >= rules.second_face_ratio,
            RejectReason.MULTIPLE_FACES,
            f"{scores['face_count']:.0f} faces, second at {scores['second_face_ratio']:.2f} of the largest",
        ),
        (
            scores["face_px"] < rules.min_face_px or scores["face_area_ratio"] < rules.min_face_area_ratio,
            RejectReason.FACE_TOO_SMALL,
            f"face {scores['face_px']:.0f} px, {scores['face_area_ratio']:.4f} of the image",
        ),
        (
            rules.min_detection_score is not None and scores["detection_score"] < rules.min_detection_score,
            RejectReason.LOW_DETECTION_SCORE,
            f"detection score {scores['detection_score']:.3f}",
        ),
        (
            abs(scores.get("yaw", 0.0)) > rules.max_abs_yaw
            or abs(scores.get("pitch", 0.0)) > rules.max_abs_pitch,
            RejectReason.EXTREME_POSE,
            f"yaw {scores.get('yaw', 0.0):.1f}, pitch {scores.get('pitch', 0.0):.1f}",
        ),
        (
            scores["sharpness"] < rules.min_face_sharpness,
            RejectReason.BLUR,
            f"sharpness {scores['sharpness']:.1f}",
        ),
        (
            scores["watermark"] > rules.max_watermark,
            RejectReason.WATERMARK,
            f"watermark {scores['watermark']:.3f}",
        ),
        (scores["nsfw"] > rules.max_nsfw, RejectReason.NSFW, f"nsfw {scores['nsfw']:.3f}"),
        (
            rules.min_aesthetic is not None and scores["aesthetic"] < rules.min_aesthetic,
            RejectReason.LOW_AESTHETICS,
            f"aesthetic {scores['aesthetic']:.2f}",
        ),
        (
            rules.same_identity_similarity is not None
            and scores.get("held_out_similarity", -1.0) >= rules.same_identity_similarity,
            RejectReason.HELD_OUT_IDENTITY,
            f"cosine {scores.get('held_out_similarity', -1.0):.3f} to a held-out identity",
        ),
        (
            scores["aspect_error"] > rules.max_aspect_error,
            RejectReason.ASPECT_RATIO,
            f"aspect error {scores['aspect_error']:.3f}",
        ),
    ]
    for failed, reason, detail in checks:
        if failed:
            return reason, detail
    return None


def read_input_shard(ref: dict[str, Any]) -> list[dict[str, Any]]:
    """A shard's records (+ the tar holding their bytes), with its global decisions applied when given."""
    records = read_parquet_records(Path(ref["records"]))
    if "decisions" in ref:
        decisions = {row["key"]: row for row in pq.read_table(ref["decisions"]).to_pylist()}
        for record in records:
            decision = decisions.get(record["key"], {})
            record["identity_cluster"] = decision.get("identity_cluster")
            if decision.get("reject_reason") and record["status"] == Status.OK:
                reject(record, decision["reject_reason"], decision["reject_detail"])
    return [{"record": record, "tar": ref["tar"]} for record in records]


class ScoreStage(Stage):
    """Per-image scores and decision. Models load once per worker in :meth:`setup`."""

    name = "score"
    uses_gpu = True
    one_to_one = True

    def __init__(self, config: FilterConfig, face: FaceConfig, quality: QualityConfig):
        self.config = config
        self.face_config = face
        self.quality_config = quality
        self.buckets = make_buckets(
            config.buckets.resolution, config.buckets.min_side, config.buckets.max_side, config.buckets.step
        )
        self.analyzer: FaceAnalyzer | None = None
        self.scorer: Any = None
        self.held_out: HeldOutIdentities | None = None

    def setup(self) -> None:
        from infu.quality.scorer import QualityScorer

        self.analyzer = load_face_analyzer(self.face_config)
        self.scorer = QualityScorer(self.quality_config)
        if self.config.held_out_identities is not None:
            self.held_out = HeldOutIdentities.from_images(
                self.analyzer, identity_photos(self.config.held_out_identities)
            )

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        assert self.analyzer is not None, "setup() first"
        decoded = [(item["record"], item["rgb"]) for item in items if item["rgb"] is not None]
        quality = self.scorer.score([Image.fromarray(rgb) for _, rgb in decoded]) if decoded else {}
        for position, (record, rgb) in enumerate(decoded):
            faces = sorted(self.analyzer.analyze_rgb(rgb), key=lambda face: face.area, reverse=True)
            height, width = rgb.shape[:2]
            bucket_width, bucket_height, aspect_error = assign_bucket(width, height, self.buckets)
            scores = {
                "min_side": float(min(width, height)),
                "aesthetic": float(quality["aesthetic"][position]),
                "nsfw": float(quality["nsfw"][position]),
                "watermark": float(quality["watermark"][position]),
                "aspect_error": float(aspect_error),
                **face_scores(rgb, faces),
            }
            if faces and self.held_out is not None:
                _, similarity = self.held_out.match(faces[0].embedding[None, :])
                scores["held_out_similarity"] = float(similarity[0])
            record.update(
                faces=face_rows(faces),
                face_embedding=[float(value) for value in faces[0].embedding] if faces else None,
                face_embedding_space=self.analyzer.embedding_space if faces else None,
                scores={**(record.get("scores") or {}), **scores},
                bucket_width=bucket_width,
                bucket_height=bucket_height,
                phash=phash(Image.fromarray(rgb)),
            )
            decision = decide(scores, self.config.thresholds)
            if decision is not None:
                reject(record, *decision)
        return [StageOutput(item["record"]) for item in items]


class AttachImageStage(Stage):
    """CPU: the original bytes of each kept record, for the final shards."""

    name = "write"
    one_to_one = True

    def __init__(self) -> None:
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [
            StageOutput(item["record"], self.images.read(item), extension_for_mime(item["record"]["mime"]))
            if item["record"]["status"] == Status.OK
            else StageOutput(item["record"])
            for item in items
        ]


def with_identity_threshold(settings: FilterConfig, face: FaceConfig) -> FilterConfig:
    """The settings with the same-identity cosine made explicit (the recognizer's default if unset)."""
    rules = settings.thresholds
    if rules.same_identity_similarity is not None:
        return settings
    threshold = SAME_IDENTITY_SIMILARITY[face.recognizer]
    return settings.model_copy(
        update={"thresholds": rules.model_copy(update={"same_identity_similarity": threshold})}
    )


def scored_embedding_space(scored_dir: Path) -> str | None:
    """The embedding space of the faces scored in ``scored_dir`` (None before any face); shards that mix
    spaces are an error: identities cannot be clustered across them."""
    rows = DatasetIndex(scored_dir).query(
        "SELECT DISTINCT face_embedding_space AS space FROM samples"
        " WHERE face_embedding_space IS NOT NULL ORDER BY space"
    )
    spaces = [row["space"] for row in rows]
    if len(spaces) > 1:
        raise StepError(f"the scored shards in {scored_dir} mix face embedding spaces {spaces}")
    return spaces[0] if spaces else None


def run_filter(config: InfuConfig) -> dict[str, Any]:
    """Run the three phases of the filter step of ``config`` and return its manifest."""
    settings = with_identity_threshold(config.step(STEP), config.face)
    input_dir = upstream_inputs(config, STEP)["ingest"]
    inputs = committed_shards(input_dir)
    if not inputs:
        raise StepError(f"no committed shards in {input_dir}: run the ingest step first")
    output = open_step_output(config, STEP, settings, shards=str(input_dir))
    out_dir = output.out_dir
    score = run_phase(
        Phase(
            label="filter: score",
            out_dir=out_dir / SCORED,
            tasks=shard_tasks(inputs, records=input_dir, tar=input_dir),
            read_task=read_input_shard,
            stages=[
                stage(DecodeStage, max_pixels=settings.max_pixels),
                stage(ScoreStage, config=settings, face=config.face, quality=config.quality),
            ],
            resources=settings.resources,
            extra_stats=output.shard_stats,
            with_images=False,
        )
    )
    run: dict[str, Any] = {"score": score.as_dict()}
    embedding_space = scored_embedding_space(out_dir / SCORED)
    failed = score.failed
    if not failed:
        run["global"] = run_reduce(
            out_dir / GLOBAL,
            output.identity,
            lambda folder: compute_global_decisions(out_dir / SCORED, folder, settings.thresholds),
        )
        write = run_phase(
            Phase(
                label="filter: write",
                out_dir=out_dir,
                tasks=shard_tasks(
                    inputs, records=out_dir / SCORED, decisions=out_dir / GLOBAL / "decisions", tar=input_dir
                ),
                read_task=read_input_shard,
                stages=[stage(AttachImageStage)],
                resources=settings.resources,
                extra_stats=output.shard_stats,
            )
        )
        run["write"] = write.as_dict()
        failed = write.failed
    return output.complete(
        failed_shards=failed,
        inputs={"shards": str(input_dir), "samples": summarize(read_stats(input_dir))["samples"]},
        embedding_space=embedding_space,
        run=run,
    )
