"""The SPMS filter (``python -m datagen filter``, step ``spms``): synthesis rows -> stage-2 pairs.

One map phase, an SPMS shard per synth shard. ``decode`` reads both images of each pair still kept;
``score`` (the step's GPUs) finds the synthetic image's faces and scores the pair:

* ``identity_similarity``: cosine of the reference's and the synthetic face's embeddings (one space);
* ``yaw``/``pitch`` of the synthetic face, ``face_count`` and ``second_face_ratio``;
* ``aesthetic`` and ``nsfw`` of the synthetic image (the quality heads);
* ``copy_paste``: correlation of the two faces' aligned grey crops. Near 1, the synthetic face is the
  reference's pasted (same expression, light and pose): a model trained on it would learn to paste.

:func:`decide` turns the scores into the first failing rule's reason; every row (kept or not, and the
synthesis' own rejects) is kept with all its scores, and kept pairs carry both images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from datagen.config import SpmsConfig, SpmsThresholds
from infu.config import InfuConfig
from infu.face import (
    SAME_IDENTITY_SIMILARITY,
    FaceConfig,
    align_face,
    cosine_similarity,
    face_rows,
    load_face_analyzer,
)
from infu.images import BadImageError, decode_image
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, read_manifest
from infu.pairs import PAIRS, read_pair_records, read_reference, reference_member
from infu.quality.config import QualityConfig
from infu.records import RejectReason, Status, reject
from infu.runner import Phase, Stage, StageOutput, run_phase, shard_tasks, stage
from infu.shards import InputImages, committed_shards
from infu.steps import StepError

STEP = "spms"
COPY_PASTE_CROP = 112
"""Side of the aligned face crops compared for copy-paste (the ArcFace template's)."""


def read_pairs(ref: dict[str, str]) -> list[dict[str, Any]]:
    """The pair rows of one synth shard, and the tar holding their images."""
    return [{"record": record, "tar": ref["tar"]} for record in read_pair_records(Path(ref["records"]))]


def copy_paste_score(
    synthetic: np.ndarray, synthetic_kps: np.ndarray, reference: np.ndarray, reference_kps: np.ndarray
) -> float:
    """Pearson correlation of the two faces' aligned grey crops: 1 for the same pixels."""
    crops = [
        cv2.cvtColor(align_face(image, kps, COPY_PASTE_CROP), cv2.COLOR_RGB2GRAY).astype(np.float64).ravel()
        for image, kps in ((synthetic, synthetic_kps), (reference, reference_kps))
    ]
    centred = [crop - crop.mean() for crop in crops]
    norms = np.linalg.norm(centred[0]) * np.linalg.norm(centred[1])
    return float(np.dot(centred[0], centred[1]) / norms) if norms > 0 else 1.0


def minimum_similarity(rules: SpmsThresholds, embedding_space: str) -> float:
    """``min_identity_similarity``, or the face stack's same-person cosine when null."""
    if rules.min_identity_similarity is not None:
        return rules.min_identity_similarity
    return SAME_IDENTITY_SIMILARITY[embedding_space]


def decide(
    scores: dict[str, float], rules: SpmsThresholds, min_similarity: float
) -> tuple[RejectReason, str] | None:
    """The pair's decision from its stored scores: the first failing rule, or None (kept)."""
    if scores["face_count"] == 0:
        return RejectReason.NO_FACE, "no face in the synthetic image"
    checks: list[tuple[bool, RejectReason, str]] = [
        (
            scores["second_face_ratio"] >= rules.second_face_ratio,
            RejectReason.MULTIPLE_FACES,
            f"{scores['face_count']:.0f} faces, second at {scores['second_face_ratio']:.2f} of the largest",
        ),
        (
            scores["identity_similarity"] < min_similarity,
            RejectReason.LOW_IDENTITY_SIMILARITY,
            f"cosine {scores['identity_similarity']:.3f} to the reference (< {min_similarity})",
        ),
        (
            abs(scores.get("yaw", 0.0)) > rules.max_abs_yaw
            or abs(scores.get("pitch", 0.0)) > rules.max_abs_pitch,
            RejectReason.EXTREME_POSE,
            f"yaw {scores.get('yaw', 0.0):.1f}, pitch {scores.get('pitch', 0.0):.1f}",
        ),
        (scores["nsfw"] > rules.max_nsfw, RejectReason.NSFW, f"nsfw {scores['nsfw']:.3f}"),
        (
            rules.min_aesthetic is not None and scores["aesthetic"] < rules.min_aesthetic,
            RejectReason.LOW_AESTHETICS,
            f"aesthetic {scores['aesthetic']:.2f}",
        ),
        (
            scores["copy_paste"] > rules.max_copy_paste,
            RejectReason.COPY_PASTE,
            f"face crops correlate {scores['copy_paste']:.3f} with the reference's",
        ),
    ]
    for failed, reason, detail in checks:
        if failed:
            return reason, detail
    return None


class DecodePairStage(Stage):
    """CPU: both images of each pair still kept, decoded (an undecodable one rejects the pair)."""

    name = "decode"
    one_to_one = True

    def __init__(self, max_pixels: int = 40_000_000):
        self.max_pixels = max_pixels
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = []
        for item in items:
            record = dict(item["record"])
            pair: dict[str, Any] = {"record": record, "synthetic": None, "reference": None}
            if record["status"] == Status.OK:
                pair["synthetic_bytes"] = self.images.read(item)
                pair["reference_bytes"] = read_reference(self.images.tar(item), record)
                try:
                    pair["synthetic"] = np.asarray(decode_image(pair["synthetic_bytes"], self.max_pixels))
                    pair["reference"] = np.asarray(decode_image(pair["reference_bytes"], self.max_pixels))
                except BadImageError as error:
                    reject(record, error.reason, error.detail)
            decoded.append(pair)
        return decoded


class ScorePairStage(Stage):
    """GPU: face analysis of the synthetic image, the quality heads and copy-paste; the decision."""

    name = "score"
    uses_gpu = True
    one_to_one = True

    def __init__(self, thresholds: SpmsThresholds, face: FaceConfig, quality: QualityConfig):
        self.thresholds = thresholds
        self.face = face
        self.quality = quality

    def setup(self) -> None:
        from infu.quality.scorer import QualityScorer

        self.analyzer = load_face_analyzer(self.face)
        self.scorer = QualityScorer(self.quality)
        self.min_similarity = minimum_similarity(self.thresholds, self.analyzer.embedding_space)

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        scored = [item for item in items if item["synthetic"] is not None]
        quality = self.scorer.score([Image.fromarray(item["synthetic"]) for item in scored]) if scored else {}
        for position, item in enumerate(scored):
            self.score(item, float(quality["aesthetic"][position]), float(quality["nsfw"][position]))
        return [self.output(item) for item in items]

    def score(self, item: dict[str, Any], aesthetic: float, nsfw: float) -> None:
        record = item["record"]
        faces = sorted(self.analyzer.analyze_rgb(item["synthetic"]), key=lambda face: face.area, reverse=True)
        scores = {
            **(record["scores"] or {}),
            "aesthetic": aesthetic,
            "nsfw": nsfw,
            "face_count": float(len(faces)),
        }
        if faces:
            largest = faces[0]
            reference_kps = np.asarray(record["reference_keypoints"], dtype=np.float32).reshape(5, 2)
            scores.update(
                second_face_ratio=faces[1].area / largest.area if len(faces) > 1 else 0.0,
                identity_similarity=cosine_similarity(
                    np.asarray(record["reference_embedding"]), largest.embedding
                ),
                copy_paste=copy_paste_score(item["synthetic"], largest.kps, item["reference"], reference_kps),
            )
            if largest.pose is not None:
                scores.update(yaw=largest.pose.yaw, pitch=largest.pose.pitch, roll=largest.pose.roll)
        record.update(
            faces=face_rows(faces),
            face_embedding=largest.embedding.tolist() if faces else None,
            face_embedding_space=self.analyzer.embedding_space if faces else None,
            scores=scores,
        )
        decision = decide(scores, self.thresholds, self.min_similarity)
        if decision is not None:
            reject(record, *decision)

    @staticmethod
    def output(item: dict[str, Any]) -> StageOutput:
        record = item["record"]
        if record["status"] != Status.OK:
            return StageOutput(record)
        return StageOutput(
            record, item["synthetic_bytes"], "png", {reference_member(record): item["reference_bytes"]}
        )


def check_embedding_space(synth_dir: Path, face: FaceConfig) -> None:
    """The references' embeddings (the synthesis' face stack) and this step's must be in one space."""
    spaces = set()
    for path in [synth_dir / f"{name}.parquet" for name in committed_shards(synth_dir)]:
        spaces |= {
            row["face_embedding_space"] for row in read_pair_records(path) if row["face_embedding_space"]
        }
    ours = face.recognizer  # each recognizer is its own embedding space
    if spaces - {ours}:
        raise StepError(
            f"the pairs in {synth_dir} have {sorted(spaces)} face embeddings but this run's face.recognizer "
            f"gives {ours}: their similarities would compare different spaces"
        )


def run_spms(config: InfuConfig) -> dict[str, Any]:
    """Filter every synthesis row into the stage-2 pairs; returns the step's manifest."""
    settings: SpmsConfig = config.step(STEP)
    synth_dir = upstream_inputs(config, STEP)["synth"]
    if not committed_shards(synth_dir):
        raise StepError(f"no committed shards in {synth_dir}: run the synth step first")
    check_embedding_space(synth_dir, config.face)
    output = open_step_output(config, STEP, settings, synth=str(synth_dir))
    phase = Phase(
        label=STEP,
        out_dir=output.out_dir,
        tasks=shard_tasks(committed_shards(synth_dir), records=synth_dir, tar=synth_dir),
        read_task=read_pairs,
        stages=[
            stage(DecodePairStage),
            stage(ScorePairStage, thresholds=settings.thresholds, face=config.face, quality=config.quality),
        ],
        resources=settings.resources,
        extra_stats=output.shard_stats,
        table=PAIRS,
    )
    result = run_phase(phase)
    synth = read_manifest(synth_dir) or {}
    return output.complete(
        failed_shards=result.failed, run={STEP: result.as_dict()}, synth_counts=synth.get("counts")
    )
