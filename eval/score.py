"""``python -m eval score`` (step ``eval``): every benchmark image scored, aggregated and reported.

A map phase, a scores shard per benchmark shard (rows only: the images stay in ``benchmark/``):
``decode`` (CPU) reads each made image; ``score`` (the step's GPUs) finds its faces with the run's face
stack and computes, against the identity photo's largest face and the prompt:

* ``id_loss`` = 1 - cosine of the identity embeddings (largest face). An image without a face, and a row
  without an image (generation failed, a baseline's missing file), gets the worst value, 2.0, and counts;
* ``face_similarity`` (the cosine itself, Infinite-ID's face-recognition similarity), ``faces``;
* ``clip_score`` (cosine of CLIP image and text embeddings, as the InfU paper reports it), ``pick_score``;
* ``clip_t`` / ``clip_i`` (open_clip: image-text, and aligned face crop vs the photo's face crop).

Then a reduce phase (``report/``, rebuilt only when the scores' identity changes): per model version
the mean of every metric with a 95% bootstrap interval over prompts and identities, FID of its images
against the identity photos (CLIP image features) and LPIPS diversity (mean over identities of the
pairwise distance of its images), ``scores.parquet``, ``summary.json`` and the report
(:mod:`eval.report`).
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eval.config import EvalConfig, LpipsConfig, OpenClipModel, ScoringModel
from eval.generate import IMAGE_SCHEMA, ImageTable
from eval.metrics import (
    NO_FACE_ID_LOSS,
    ClipImageFeatures,
    ClipScorer,
    IdentityScorer,
    LpipsDiversity,
    OpenClipScorer,
    PickScorer,
    bootstrap_ci,
    frechet_distance,
    write_random_lpips_backbone,
)
from eval.report import METRICS
from infu.config import InfuConfig
from infu.face import FaceConfig, load_face_analyzer
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, read_manifest
from infu.paths import write_atomic
from infu.records import Status
from infu.runner import DecodeStage, Phase, Stage, StageOutput, run_phase, run_reduce, shard_tasks, stage
from infu.shards import TarReader, committed_shards
from infu.steps import StepError

STEP = "eval"
REPORT_DIR = "report"
METRIC_KEYS = tuple(key for key, _, _ in METRICS)
SCORE_SCHEMA = pa.schema(
    [
        *IMAGE_SCHEMA,
        pa.field("faces", pa.int32()),
        *(pa.field(key, pa.float64()) for key in METRIC_KEYS),
    ]
)


class ScoreTable(ImageTable):
    schema = SCORE_SCHEMA


SCORES = ScoreTable()


def clip_scorer(settings: ScoringModel, cls: type[ClipScorer], device: str) -> ClipScorer:
    if settings.path is not None:
        return cls.from_pretrained(settings.path, settings.processor, device=device)
    return cls.tiny(int(settings.tiny_seed or 0), device=device)


def open_clip_scorer(settings: OpenClipModel, device: str) -> OpenClipScorer:
    if settings.weights is not None:
        return OpenClipScorer.from_checkpoint(settings.model_name, settings.weights, device=device)
    return OpenClipScorer.tiny(int(settings.tiny_seed or 0), device=device)


def read_images(ref: dict[str, str]) -> list[dict[str, Any]]:
    rows = pq.read_table(ref["records"], schema=IMAGE_SCHEMA).to_pylist()
    return [{"record": row, "tar": ref["tar"]} for row in rows]


class ScoreStage(Stage):
    """GPU: the face stack, CLIP, PickScore and open_clip on each image (references once per photo)."""

    name = "score"
    uses_gpu = True
    one_to_one = True

    def __init__(self, settings: EvalConfig, face: FaceConfig, device: str):
        self.settings = settings
        self.face = face
        self.device = device

    def setup(self) -> None:
        self.identity = IdentityScorer(load_face_analyzer(self.face))
        self.clip = clip_scorer(self.settings.clip, ClipScorer, self.device)
        self.pick = clip_scorer(self.settings.pickscore, PickScorer, self.device)
        self.open_clip = open_clip_scorer(self.settings.open_clip, self.device)
        self.references: dict[str, Any] = {}

    def reference(self, photo: str) -> Any:
        if photo not in self.references:
            self.references[photo] = self.identity.reference(Path(photo))
        return self.references[photo]

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        rows = [{**item["record"], "faces": 0, **dict.fromkeys(METRIC_KEYS)} for item in items]
        for row in rows:  # no image: the worst identity score, counted
            row.update(id_loss=NO_FACE_ID_LOSS, face_similarity=1 - NO_FACE_ID_LOSS)
        scored = [
            (row, item["rgb"]) for row, item in zip(rows, items, strict=True) if item["rgb"] is not None
        ]
        if scored:
            images = [Image.fromarray(rgb) for _, rgb in scored]
            prompts = [row["prompt"] for row, _ in scored]
            references = [self.reference(row["photo"]) for row, _ in scored]
            matches = [
                self.identity.match(ref, rgb) for ref, (_, rgb) in zip(references, scored, strict=True)
            ]
            columns = {
                "clip_score": self.clip.score(images, prompts),
                "pick_score": self.pick.score(images, prompts),
                "clip_t": self.open_clip.clip_t(images, prompts),
                "clip_i": self.open_clip.clip_i([m.crop for m in matches], [ref.crop for ref in references]),
            }
            for index, ((row, _), match) in enumerate(zip(scored, matches, strict=True)):
                row.update(
                    id_loss=match.id_loss,
                    face_similarity=match.similarity,
                    faces=match.faces,
                    **{key: float(values[index]) for key, values in columns.items()},
                )
        return [StageOutput(row) for row in rows]


def score_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Every score row of the committed shards, in shard order."""
    return [
        row
        for name in committed_shards(out_dir)
        for row in pq.read_table(out_dir / f"{name}.parquet", schema=SCORE_SCHEMA).to_pylist()
    ]


def lpips_metric(settings: LpipsConfig, folder: Path) -> LpipsDiversity:
    """The configured LPIPS; a tiny one's random backbone is written under ``folder`` first."""
    if settings.hub_dir is not None:
        return LpipsDiversity(settings.hub_dir, settings.net)
    hub_dir = folder / "lpips_hub"
    write_random_lpips_backbone(hub_dir, settings.net, int(settings.tiny_seed or 0))
    return LpipsDiversity(hub_dir, settings.net)


def summarize_model(
    rows: list[dict[str, Any]], settings: EvalConfig, extra: dict[str, Any]
) -> dict[str, Any]:
    """A model version's aggregates: every metric's mean and interval over its rows (a metric without a
    value in a row, e.g. CLIPScore of a missing image, leaves that row out), counts and ``extra``."""
    metrics = {}
    for key in METRIC_KEYS:
        kept = [row for row in rows if row[key] is not None]
        if kept:
            interval = bootstrap_ci(
                [row[key] for row in kept],
                [row["prompt_id"] for row in kept],
                [row["identity"] for row in kept],
                n=settings.bootstrap_samples,
                seed=settings.seed,
            )
            metrics[key] = {
                "mean": interval.mean,
                "low": interval.low,
                "high": interval.high,
                "count": interval.count,
            }
    return {
        "images": len(rows),
        "scored": sum(1 for row in rows if row["status"] == Status.OK),
        "no_face": sum(1 for row in rows if row["faces"] == 0),
        "metrics": metrics,
        **extra,
    }


def build_report(
    folder: Path, out_dir: Path, benchmark_dir: Path, settings: EvalConfig, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The reduce phase: scores.parquet, summary.json and the report in ``folder``."""
    from eval.report import render_report

    rows = score_rows(out_dir)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), folder / "scores.parquet")
    tars: dict[str, TarReader] = {}

    def image_bytes(row: dict[str, Any]) -> bytes:
        if row["shard"] not in tars:
            tars[row["shard"]] = TarReader(benchmark_dir / f"{row['shard']}.tar")
        return tars[row["shard"]].read(f"{row['key']}.png")

    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    features = ClipImageFeatures(clip_scorer(settings.clip, ClipScorer, "cpu")) if settings.fid else None
    photos = {row["photo"]: Image.open(row["photo"]).convert("RGB") for row in rows} if features else {}
    lpips = lpips_metric(settings.lpips, folder) if settings.lpips is not None else None
    models = {}
    for model, model_rows in by_model.items():
        extra: dict[str, Any] = {"fid": None, "lpips_diversity": None}
        images = {
            row["key"]: Image.open(io.BytesIO(image_bytes(row))).convert("RGB")
            for row in model_rows
            if row["status"] == Status.OK and (features is not None or lpips is not None)
        }
        if features is not None and len(images) >= 2 and len(photos) >= 2:
            extra["fid"] = frechet_distance(list(photos.values()), list(images.values()), features)
        if lpips is not None:
            per_identity = defaultdict(list)
            for row in model_rows:
                if row["key"] in images:
                    per_identity[row["identity"]].append(images[row["key"]])
            values = [lpips.diversity(group) for group in per_identity.values() if len(group) >= 2]
            extra["lpips_diversity"] = float(np.mean(values)) if values else None
        models[model] = summarize_model(model_rows, settings, extra)
    summary = {"benchmark": manifest.get("benchmark") or {}, "models": models}
    write_atomic(folder / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    written = render_report(rows, summary, folder, image_bytes, worst=settings.worst)
    return {
        "images": len(rows),
        "models": sorted(models),
        "files": sorted(str(Path(p).name) for p in written.values()),
    }


def run_eval(config: InfuConfig) -> dict[str, Any]:
    """Score every benchmark image and build the report; returns the step's manifest."""
    settings: EvalConfig = config.step(STEP)
    benchmark_dir = upstream_inputs(config, STEP)["benchmark"]
    manifest = read_manifest(benchmark_dir) or {}
    if manifest.get("status") != "complete":
        raise StepError(f"{benchmark_dir} holds no complete benchmark images: run the benchmark step first")
    output = open_step_output(config, STEP, settings, benchmark=str(benchmark_dir))
    phase = Phase(
        label=STEP,
        out_dir=output.out_dir,
        tasks=shard_tasks(committed_shards(benchmark_dir), records=benchmark_dir, tar=benchmark_dir),
        read_task=read_images,
        stages=[
            stage(DecodeStage),
            stage(
                ScoreStage,
                settings=settings,
                face=config.face,
                device="cuda" if settings.resources.num_gpus > 0 else "cpu",
            ),
        ],
        resources=settings.resources,
        extra_stats=output.shard_stats,
        with_images=False,
        table=SCORES,
    )
    result = run_phase(phase)
    if result.failed:
        return output.complete(failed_shards=result.failed, run={STEP: result.as_dict()})
    report = run_reduce(
        output.out_dir / REPORT_DIR,
        output.identity,
        lambda folder: build_report(folder, output.out_dir, benchmark_dir, settings, manifest),
    )
    summary = json.loads((output.out_dir / REPORT_DIR / "summary.json").read_text())
    return output.complete(run={STEP: result.as_dict()}, report=report, summary=summary)
