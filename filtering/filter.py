"""The SPSS filter: raw shards -> single-person portrait shards, one decision per input sample.

Three resumable phases, each committing shards atomically:

1. **score** (Ray actor pool, models loaded once per worker): decode, face analysis, face sharpness,
   CLIP-based quality heads, held-out identity match, aspect bucket, perceptual hash; a per-image
   decision. Records only (``filter/_scored/``).
2. **global** (driver): exact (sha256) and near (pHash) duplicates among the images still kept, keeping
   the first in key order, and identity clusters per dataset -> ``filter/_global/decisions.parquet``.
3. **write** (Ray): the final shards in ``filter/`` with the kept samples' original bytes and every
   input sample's record, kept or rejected, with all its scores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from filtering.buckets import assign_bucket, make_buckets
from filtering.dedup import find_duplicates, phash
from filtering.identity import SAME_IDENTITY_SIMILARITY, HeldOutIdentities, cluster_identities
from infu.config import FilterConfig, FilterThresholds, InfuConfig
from infu.face import Face, FaceAnalyzer, FaceConfig, load_face_analyzer
from infu.images import BadImageError, decode_image, extension_for_mime
from infu.manifest import open_step_output, summarize
from infu.quality.config import QualityConfig
from infu.records import RejectReason, Status, reject, table_to_records
from infu.runner import ShardTask, Stage, StageOutput, run_shards
from infu.shards import TarReader, committed_shards, parquet_paths, read_stats

STEP = "filter"
SCORED = "_scored"
GLOBAL_DECISIONS = "_global/decisions.parquet"
IMAGE_EXTENSIONS = ("*.jpg", "*.jpeg", "*.png", "*.webp")


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


def _face_rows(faces: list[Face]) -> list[dict[str, Any]]:
    return [
        {
            "bbox": [float(value) for value in face.bbox],
            "score": float(face.score),
            "keypoints": [float(value) for value in np.asarray(face.kps).reshape(-1)],
            "yaw": face.pose.yaw if face.pose else None,
            "pitch": face.pose.pitch if face.pose else None,
            "roll": face.pose.roll if face.pose else None,
        }
        for face in faces
    ]


class InputImages:
    """Original bytes of input records, read from their shard tar (one open index at a time)."""

    def __init__(self) -> None:
        self._tar: TarReader | None = None

    def read(self, item: dict[str, Any]) -> bytes:
        if self._tar is None or str(self._tar.path) != item["tar"]:
            self._tar = TarReader(Path(item["tar"]))
        record = item["record"]
        return self._tar.read(f"{record['key']}.{extension_for_mime(record['mime'])}")


def _held_out_folders(root: Path) -> dict[str, list[Path]]:
    return {
        folder.name: sorted(path for pattern in IMAGE_EXTENSIONS for path in folder.glob(pattern))
        for folder in sorted(root.iterdir())
        if folder.is_dir()
    }


class ScoreStage(Stage):
    """Phase 1: per-image scores and decision. Models load once per worker in :meth:`setup`."""

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
        self.images = InputImages()

    def setup(self) -> None:
        from infu.quality.scorer import QualityScorer

        self.analyzer = load_face_analyzer(self.face_config)
        self.scorer = QualityScorer(self.quality_config)
        if self.config.held_out_identities is not None:
            self.held_out = HeldOutIdentities.from_images(
                self.analyzer, _held_out_folders(self.config.held_out_identities)
            )

    def process_batch(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        assert self.analyzer is not None, "setup() first"
        records = [dict(item["record"]) for item in items]
        decoded: list[tuple[int, np.ndarray]] = []
        for index, (item, record) in enumerate(zip(items, records, strict=True)):
            if record["status"] != Status.OK:
                continue
            try:
                image = decode_image(self.images.read(item), self.config.max_pixels)
            except BadImageError as error:
                reject(record, error.reason, error.detail)
                continue
            decoded.append((index, np.asarray(image)))
        quality = self.scorer.score([Image.fromarray(rgb) for _, rgb in decoded]) if decoded else {}
        for position, (index, rgb) in enumerate(decoded):
            record = records[index]
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
                faces=_face_rows(faces),
                face_embedding=[float(value) for value in faces[0].embedding] if faces else None,
                scores={**(record.get("scores") or {}), **scores},
                bucket_width=bucket_width,
                bucket_height=bucket_height,
                phash=phash(Image.fromarray(rgb)),
            )
            decision = decide(scores, self.config.thresholds)
            if decision is not None:
                reject(record, *decision)
        return [StageOutput(record) for record in records]


class WriteStage(Stage):
    """Phase 3: apply the global decisions and write kept samples with their original bytes."""

    def __init__(self, decisions_path: str):
        self.decisions_path = decisions_path
        self.decisions: dict[str, dict[str, Any]] = {}
        self.images = InputImages()

    def setup(self) -> None:
        table = pq.read_table(self.decisions_path)
        self.decisions = {row["key"]: row for row in table.to_pylist()}

    def process_batch(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        outputs = []
        for item in items:
            record = dict(item["record"])
            decision = self.decisions.get(record["key"], {})
            record["identity_cluster"] = decision.get("identity_cluster")
            if decision.get("reject_reason") and record["status"] == Status.OK:
                reject(record, decision["reject_reason"], decision["reject_detail"])
            if record["status"] != Status.OK:
                outputs.append(StageOutput(record))
                continue
            outputs.append(StageOutput(record, self.images.read(item), extension_for_mime(record["mime"])))
        return outputs


def global_decisions(scored_dir: Path, rules: FilterThresholds) -> pa.Table:
    """Duplicates among kept images (first key wins) and per-dataset identity clusters."""
    columns = ["key", "dataset", "status", "sha256", "phash", "face_embedding"]
    table = pa.concat_tables(
        [pq.read_table(path, columns=columns) for path in parquet_paths(scored_dir)]
    ).sort_by("key")
    kept = table.filter(pa.compute.equal(table["status"], Status.OK.value))
    keys = kept["key"].to_pylist()
    duplicates = find_duplicates(
        keys, kept["sha256"].to_pylist(), kept["phash"].to_pylist(), max_distance=rules.max_phash_distance
    )
    clusters: dict[str, str] = {}
    for dataset in sorted(set(kept["dataset"].to_pylist())):
        part = kept.filter(pa.compute.equal(kept["dataset"], dataset))
        part = part.filter(pa.compute.invert(pa.compute.is_null(part["face_embedding"])))
        if part.num_rows:
            embeddings = np.asarray(part["face_embedding"].to_pylist(), dtype=np.float32)
            ids = cluster_identities(
                part["key"].to_pylist(), embeddings, rules.same_identity_similarity, dataset=dataset
            )
            clusters.update(zip(part["key"].to_pylist(), ids, strict=True))
    rows = []
    for key in sorted(set(duplicates) | set(clusters)):
        duplicate = duplicates.get(key)
        rows.append(
            {
                "key": key,
                "reject_reason": RejectReason.DUPLICATE.value if duplicate else None,
                "reject_detail": duplicate[0] if duplicate else None,
                "identity_cluster": clusters.get(key),
            }
        )
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("reject_reason", pa.string()),
            ("reject_detail", pa.string()),
            ("identity_cluster", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def shard_tasks(records_dir: Path, tar_dir: Path) -> Iterator[ShardTask]:
    """One output shard per input shard, items = the input records (+ where their bytes are); read
    lazily, one shard's Parquet at a time, as the runner asks for them."""
    for name in committed_shards(records_dir):
        records = table_to_records(pq.read_table(records_dir / f"{name}.parquet"))
        yield ShardTask(name, [{"record": record, "tar": str(tar_dir / f"{name}.tar")} for record in records])


def with_identity_threshold(settings: FilterConfig, face: FaceConfig) -> FilterConfig:
    """The settings with the same-identity cosine made explicit (the face backend's default if unset)."""
    rules = settings.thresholds
    if rules.same_identity_similarity is not None:
        return settings
    threshold = SAME_IDENTITY_SIMILARITY[face.backend]
    return settings.model_copy(
        update={"thresholds": rules.model_copy(update={"same_identity_similarity": threshold})}
    )


def run_filter(config: InfuConfig) -> dict[str, Any]:
    """Run the three phases of the filter step of ``config`` and return its manifest."""
    settings = with_identity_threshold(config.step(STEP), config.face)
    input_dir = settings.input or config.step_dir("ingest")
    if not committed_shards(input_dir):
        raise FileNotFoundError(f"no committed shards in {input_dir}: run the ingest step first")
    output = open_step_output(config, STEP, settings, shards=str(input_dir))
    out_dir = output.out_dir
    stats = {"config_hash": output.config_hash}
    score_run = run_shards(
        out_dir / SCORED,
        shard_tasks(input_dir, input_dir),
        partial(ScoreStage, settings, config.face, config.quality),
        settings.resources,
        label="filter: score",
        total_shards=len(committed_shards(input_dir)),
        extra_stats=stats,
        with_images=False,
    )
    decisions = out_dir / GLOBAL_DECISIONS
    if not decisions.exists():
        decisions.parent.mkdir(exist_ok=True)
        table = global_decisions(out_dir / SCORED, settings.thresholds)
        pq.write_table(table, decisions.with_suffix(".tmp"))
        os.replace(decisions.with_suffix(".tmp"), decisions)
    write_run = run_shards(
        out_dir,
        shard_tasks(out_dir / SCORED, input_dir),
        partial(WriteStage, str(decisions)),
        settings.resources.model_copy(update={"num_gpus": 0.0}),
        label="filter: write",
        total_shards=len(committed_shards(input_dir)),
        extra_stats=stats,
    )
    return output.complete(
        inputs={"shards": str(input_dir), "samples": summarize(read_stats(input_dir))["samples"]},
        run={"score": score_run, "write": write_run},
    )
