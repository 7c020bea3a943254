"""The caption step: the filter's kept samples -> one captions Parquet per shard, one column per source.

One map phase over the filter's committed shards (the output shard ``NNNNNN`` captions input shard
``NNNNNN``; image bytes are not copied again). Per chunk of samples:

1. ``decode`` (CPU): the original bytes from the filter's shard tar, decoded and downscaled to
   ``max_side`` (every captioner resizes anyway);
2. one stage per neural source (``small``, ``blip2``, ``internvl2``): a model-holding actor pool with the
   step's GPUs, loaded once per worker, in the Ray runtime environment its engine needs;
3. ``assemble`` (CPU): the ``original`` (dataset text) and ``attribute`` captions, then the caption
   checks of :mod:`captioning.quality` on every source, into one caption row per sample.

Shard stats carry per-source caption statistics (lengths, vocabulary, flags) for the dashboards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from captioning.attribute import attribute_caption
from captioning.config import CaptionConfig, CaptionQuality, NeuralCaptioner
from captioning.engines import load_captioner, runtime_env_for
from captioning.quality import CaptionChecker, caption_stats
from infu.captions import captions_to_table
from infu.config import InfuConfig
from infu.images import BadImageError, decode_image
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, summarize
from infu.records import Status
from infu.runner import Phase, Stage, StageOutput, StageRef, run_phase, shard_tasks, stage
from infu.shards import InputImages, ShardTable, committed_shards, read_parquet_records, read_stats
from infu.steps import StepError

STEP = "caption"
RECORD_FIELDS = ("key", "dataset", "mime", "width", "height", "attributes", "faces", "scores", "captions")
"""What the caption stages need of a filter record (the rest stays in the filter's shards)."""
GRAYSCALE_MAX_CHANNEL_SPREAD = 3.0
"""Mean |R-G| + |G-B| (0..255 levels) under which a photo is black and white."""


def read_kept_samples(ref: dict[str, str]) -> list[dict[str, Any]]:
    """The kept samples of one filter shard: the fields captioning reads, and the tar holding the bytes."""
    return [
        {"record": {field: record[field] for field in RECORD_FIELDS}, "tar": ref["tar"]}
        for record in read_parquet_records(Path(ref["records"]))
        if record["status"] == Status.OK
    ]


def is_grayscale(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)
    spread = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    return float(spread.mean()) < GRAYSCALE_MAX_CHANNEL_SPREAD


class DecodeStage(Stage):
    """CPU: each sample's original image, decoded and downscaled to ``max_side`` (None if undecodable:
    its neural captions are then missing)."""

    name = "decode"
    one_to_one = True

    def __init__(self, max_side: int, max_pixels: int):
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = []
        for item in items:
            try:
                image = decode_image(self.images.read(item), self.max_pixels)
                image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
            except BadImageError:
                image = None
            decoded.append({"record": item["record"], "image": image, "captions": {}})
        return decoded


class NeuralCaptionStage(Stage):
    """One neural source: its captioner loads once per worker and captions each chunk's images."""

    source: ClassVar[str]
    uses_gpu = True
    one_to_one = True

    def __init__(self, settings: NeuralCaptioner):
        self.settings = settings
        self.captioner: Any = None

    def setup(self) -> None:
        self.captioner = load_captioner(self.source, self.settings)

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with_image = [item for item in items if item["image"] is not None]
        texts = self.captioner.caption([item["image"] for item in with_image]) if with_image else []
        for item, text in zip(with_image, texts, strict=True):
            item["captions"][self.source] = text
        return items


class SmallCaptionStage(NeuralCaptionStage):
    name = source = "small"


class Blip2CaptionStage(NeuralCaptionStage):
    name = source = "blip2"


class InternVL2CaptionStage(NeuralCaptionStage):
    name = source = "internvl2"


NEURAL_STAGES: dict[str, type[NeuralCaptionStage]] = {
    stage_class.source: stage_class
    for stage_class in (SmallCaptionStage, Blip2CaptionStage, InternVL2CaptionStage)
}


class AssembleStage(Stage):
    """CPU: the model-free sources, then the caption checks: one caption row per sample."""

    name = "assemble"
    one_to_one = True

    def __init__(self, sources: list[str], attribute_seed: int | None, quality: CaptionQuality):
        self.sources = sources
        self.attribute_seed = attribute_seed
        self.checker = CaptionChecker(quality)

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [StageOutput(self.caption_row(item)) for item in items]

    def caption_row(self, item: dict[str, Any]) -> dict[str, Any]:
        record, image = item["record"], item.get("image")
        raw = dict(item.get("captions", {}))
        if "original" in self.sources:
            raw["original"] = (record["captions"] or {}).get("original")
        if self.attribute_seed is not None:
            grayscale = image is not None and is_grayscale(image)
            raw["attribute"] = attribute_caption(record, self.attribute_seed, grayscale=grayscale)
        row: dict[str, Any] = {"key": record["key"], "dataset": record["dataset"], "flags": {}}
        for source in self.sources:
            row[source] = None  # no text from this source (no dataset text, an undecodable image)
            if raw.get(source) is not None:
                row[source], flags = self.checker.check(raw[source])
                if flags:
                    row["flags"][source] = flags
        return row


class CaptionTable(ShardTable):
    """Caption rows: a sample with at least one caption counts as ok, one with none as ``no_caption``;
    the stats carry per-source caption statistics."""

    def __init__(self, sources: list[str]):
        self.sources = sources

    def to_table(self, rows: list[dict[str, Any]]) -> Any:
        return captions_to_table(rows)

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        uncaptioned = sum(1 for row in rows if all(row.get(source) is None for source in self.sources))
        return {
            "ok": len(rows) - uncaptioned,
            "rejected": uncaptioned,
            "reasons": {"no_caption": uncaptioned} if uncaptioned else {},
            "captions": caption_stats(rows, self.sources),
        }


def caption_stages(settings: CaptionConfig) -> list[StageRef]:
    """decode, one stage per neural source (in its engine's runtime environment), assemble."""
    refs = [stage(DecodeStage, max_side=settings.max_side, max_pixels=settings.max_pixels)]
    for source, captioner in settings.neural().items():
        refs.append(stage(NEURAL_STAGES[source], runtime_env=runtime_env_for(captioner), settings=captioner))
    attribute_seed = settings.attribute.seed if settings.attribute is not None else None
    refs.append(
        stage(
            AssembleStage, sources=settings.sources(), attribute_seed=attribute_seed, quality=settings.quality
        )
    )
    return refs


def caption_phase(
    settings: CaptionConfig, input_dir: Path, out_dir: Path, extra_stats: dict[str, Any] | None = None
) -> Phase:
    """The step's map phase: every committed shard of ``input_dir`` -> its captions shard in ``out_dir``."""
    return Phase(
        label="caption",
        out_dir=out_dir,
        tasks=shard_tasks(committed_shards(input_dir), records=input_dir, tar=input_dir),
        read_task=read_kept_samples,
        stages=caption_stages(settings),
        resources=settings.resources,
        extra_stats=extra_stats or {},
        with_images=False,
        table=CaptionTable(settings.sources()),
    )


def run_caption(config: InfuConfig) -> dict[str, Any]:
    """Caption every kept sample of the filter's output; returns the step's manifest."""
    settings: CaptionConfig = config.step(STEP)
    input_dir = upstream_inputs(config, STEP)["filter"]
    if not committed_shards(input_dir):
        raise StepError(f"no committed shards in {input_dir}: run the filter step first")
    output = open_step_output(config, STEP, settings, shards=str(input_dir))
    result = run_phase(caption_phase(settings, input_dir, output.out_dir, output.shard_stats))
    return output.complete(
        failed_shards=result.failed,
        inputs={"shards": str(input_dir), "kept_samples": summarize(read_stats(input_dir))["ok"]},
        sources=settings.sources(),
        run={"caption": result.as_dict()},
    )
