"""``python -m eval generate`` (step ``benchmark``): the benchmark's images, for every model version.

The pairs are every identity with every prompt its gender pairs with (:mod:`eval.benchmark`), one image
per seed. A model version is a training step's export of this run (``models``), a checkpoint
(``checkpoints``), another method's images (``baselines``, placed by a mapping file) or, for
``model.family: infinite_id``, an ablation (``ablations``: a version's adapter with inference switches
of its own). One map phase: each shard is ``pairs_per_shard``
pairs of one version; ``generate`` (the step's GPUs) loads a version's pipeline (InfU, or Infinite-ID's
with the version's adapter) once per worker and makes each image from the identity photo's face, the
prompt and the pair's seed (a baseline's image is read and checked instead). Every pair is a row: an
image that cannot be made or found is a rejected row with the reason, and is counted by the scores. A
killed run resumes at the first shard not committed; images are seeded, so a rerun makes the same ones.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from eval.benchmark import Benchmark, Pair, pairs, sample_corpus_identities
from eval.config import BaselineImages, BenchmarkConfig, InfiniteIdAblation
from infu.config import InfuConfig
from infu.face import FaceConfig, NoFaceError, load_face_analyzer
from infu.identities import Identity, folder_identities
from infu.images import BadImageError, decode_image, png_bytes
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, trained_export
from infu.model.config import ModelConfig
from infu.records import RejectReason, Status
from infu.runner import Phase, ShardTask, Stage, StageOutput, run_phase, stage
from infu.shards import ShardTable
from infu.steps import StepError

STEP = "benchmark"
log = logging.getLogger(__name__)

AXES_TYPE = pa.struct(
    [
        pa.field(name, pa.string())
        for name in ("length", "face_size", "view", "scene", "age", "style", "complexity")
    ]
)
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("identity", pa.string(), nullable=False),
        pa.field("gender", pa.string()),
        pa.field("photo", pa.string()),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("prompt_gender", pa.string()),
        pa.field("axes", AXES_TYPE),
        pa.field("seed", pa.int64()),
        pa.field("seed_index", pa.int32()),
        pa.field("mime", pa.string()),
    ]
)
"""A benchmark image's row: the pair (identity, prompt, seed), the model version, the outcome."""


class ImageTable(ShardTable):
    """Rows of :data:`IMAGE_SCHEMA` (the scores step adds its columns to the same rows)."""

    schema = IMAGE_SCHEMA

    def to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.schema)


IMAGES = ImageTable()


def image_key(model: str, pair_id: str, seed_index: int) -> str:
    """A row's key (and tar member name): the model version and a hash of the pair and seed index."""
    digest = hashlib.sha1(f"{pair_id}/{seed_index}".encode()).hexdigest()[:16]
    return f"{model}-{digest}"


def benchmark_identities(settings: BenchmarkConfig) -> list[Identity]:
    """The configured identities; the sample corpus is built where it is configured when absent (it is
    made from package photos, the same wherever it is built)."""
    if settings.identity_source == "sample_corpus":
        from infu.sample_corpus import ensure_sample_corpus

        return sample_corpus_identities(ensure_sample_corpus(settings.identities))
    return folder_identities(settings.identities)


def benchmark_pairs(settings: BenchmarkConfig) -> tuple[Benchmark, list[Identity], list[Pair]]:
    """The benchmark, its identities and their pairs (the first ``prompts_per_tag`` prompts of each gender
    tag only, when set)."""
    benchmark = Benchmark.load(settings.file)
    if settings.prompts_per_tag is not None:
        kept: list[Any] = []
        for tag in ("man", "woman", "any"):
            kept += [prompt for prompt in benchmark.prompts if prompt.gender == tag][
                : settings.prompts_per_tag
            ]
        benchmark = benchmark.model_copy(update={"prompts": kept})
    identities = benchmark_identities(settings)
    return benchmark, identities, pairs(benchmark, identities)


def pair_rows(model: str, source: str, pair_list: list[Pair]) -> list[dict[str, Any]]:
    """One row per image to make: every pair and seed index of one model version."""
    rows = []
    for pair in pair_list:
        for index, seed in enumerate(pair.seeds):
            rows.append(
                {
                    "key": image_key(model, pair.id, index),
                    "status": Status.OK.value,
                    "reject_reason": None,
                    "reject_detail": None,
                    "model": model,
                    "source": source,
                    "identity": pair.identity.name,
                    "gender": pair.identity.gender,
                    "photo": str(pair.identity.photo),
                    "prompt_id": pair.prompt.id,
                    "prompt": pair.prompt.text,
                    "prompt_gender": pair.prompt.gender,
                    "axes": pair.prompt.axes.model_dump(),
                    "seed": seed,
                    "seed_index": index,
                    "mime": "image/png",
                }
            )
    return rows


def baseline_images(
    baseline: BaselineImages, pair_list: list[Pair], name: str
) -> dict[tuple[str, str, int], Path]:
    """(identity, prompt id, seed index) -> image file, from the baseline's mapping; an entry naming an
    unknown identity or prompt, or a missing file, is a :class:`StepError`."""
    entries = yaml.safe_load(baseline.mapping.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise StepError(f"baseline {name}: mapping {baseline.mapping} must be a YAML list")
    prompt_ids = {pair.prompt.text: pair.prompt.id for pair in pair_list} | {
        pair.prompt.id: pair.prompt.id for pair in pair_list
    }
    identities = {pair.identity.name for pair in pair_list}
    placed: dict[tuple[str, str, int], Path] = {}
    for number, entry in enumerate(entries):
        where = f"baseline {name}: mapping {baseline.mapping} entry {number}"
        if not isinstance(entry, dict) or not {"identity", "prompt", "image"} <= set(entry):
            raise StepError(f"{where} needs identity, prompt and image")
        if entry["identity"] not in identities:
            raise StepError(f"{where}: identity {entry['identity']!r} is not a benchmark identity")
        if entry["prompt"] not in prompt_ids:
            raise StepError(f"{where}: prompt {entry['prompt']!r} is not a benchmark prompt (text or id)")
        image = baseline.images / str(entry["image"])
        if not image.is_file():
            raise StepError(f"{where}: image {image} does not exist")
        placed[(entry["identity"], prompt_ids[entry["prompt"]], int(entry.get("index", 0)))] = image
    return placed


def benchmark_tasks(
    settings: BenchmarkConfig, inputs: dict[str, Path], pair_list: list[Pair]
) -> list[ShardTask]:
    """One task per ``pairs_per_shard`` pairs of each model version: its rows and where its images come
    from (a checkpoint, with an ablation's inference switches, or a baseline's files)."""
    checkpoints = {model: str(trained_export(inputs[model])) for model in settings.models}
    checkpoints |= {name: str(path) for name, path in settings.checkpoints.items()}
    versions: list[tuple[str, str, str | None, dict[str, Any], dict[tuple[str, str, int], Path]]] = [
        (model, "trained", checkpoints[model], {}, {}) for model in settings.models
    ]
    versions += [(name, "checkpoint", checkpoints[name], {}, {}) for name in settings.checkpoints]
    versions += [
        (name, "ablation", checkpoints[ablation.model], ablation.switches(), {})
        for name, ablation in settings.ablations.items()
    ]
    versions += [
        (name, "baseline", None, {}, baseline_images(baseline, pair_list, name))
        for name, baseline in settings.baselines.items()
    ]
    size = settings.pairs_per_shard
    tasks = []
    for model, source, checkpoint, switches, placed in versions:
        for number, start in enumerate(range(0, len(pair_list), size)):
            rows = pair_rows(model, source, pair_list[start : start + size])
            for row in rows:
                image = placed.get((row["identity"], row["prompt_id"], row["seed_index"]))
                row["image_file"] = str(image) if image else None
            ref = {"checkpoint": checkpoint, "switches": switches, "rows": rows}
            tasks.append(ShardTask(f"{model}-{number:05d}", ref))
    return tasks


def read_rows(ref: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"checkpoint": ref["checkpoint"], "switches": ref["switches"], "row": row} for row in ref["rows"]]


def check_ablations(config: InfuConfig) -> None:
    """Ablations set Infinite-ID's inference switches: a :class:`StepError` unless ``model.family`` is
    infinite_id."""
    ablations: dict[str, InfiniteIdAblation] = config.step(STEP).ablations
    if ablations and config.model.family != "infinite_id":
        raise StepError(
            f"benchmark.ablations ({', '.join(ablations)}) set Infinite-ID's inference switches: they "
            f"need model.family infinite_id, not {config.model.family}"
        )


class GenerateStage(Stage):
    """GPU: each row's image, from its model version's pipeline (loaded once per worker and version) or
    read from a baseline's file. ``embeddings`` holds each identity photo's InfU embedding, or its
    Infinite-ID face features (image tower hidden states and embedding: the same for every adapter)."""

    name = "generate"
    uses_gpu = True
    one_to_one = True

    def __init__(self, model: ModelConfig, face: FaceConfig, device: str):
        self.model = model
        self.face = face
        self.device = device
        self.loaded: tuple[str, Any] | None = None
        self.embeddings: dict[str, Any] = {}

    def setup(self) -> None:
        self.analyzer = load_face_analyzer(self.face)
        # prompts are recorded whole in the rows; the text encoders' token budgets cut long ones
        for pipeline in ("flux.pipeline_flux", "stable_diffusion_xl.pipeline_stable_diffusion_xl"):
            logging.getLogger(f"diffusers.pipelines.{pipeline}").setLevel(logging.ERROR)

    def pipeline(self, checkpoint: str) -> Any:
        """The pipeline of ``checkpoint``: an InfU checkpoint, or for ``model.family: infinite_id`` an
        Infinite-ID adapter folder (the previous pipeline is released first)."""
        from infu.model.factory import build_infinite_id_pipeline, build_pipeline

        if self.loaded is None or self.loaded[0] != checkpoint:
            self.loaded = None
            if self.model.family == "infinite_id":
                settings = self.model.infinite_id.model_copy(update={"adapter": Path(checkpoint)})
                model = self.model.model_copy(update={"infinite_id": settings})
                pipeline = build_infinite_id_pipeline(model, self.analyzer, self.device)
            else:
                model = self.model.model_copy(update={"infu_model": Path(checkpoint)})
                pipeline = build_pipeline(model, self.analyzer, self.device)
            pipeline.set_progress_bar_config(disable=True)
            self.loaded = (checkpoint, pipeline)
        return self.loaded[1]

    def identity(self, photo: str, checkpoint: str) -> Any:
        """The photo's InfU embedding or Infinite-ID face features, once per photo; raises
        :class:`NoFaceError` when it has no face."""
        import torch

        from infu.model.conditioning import identity_from_images

        if photo not in self.embeddings:
            if self.model.family == "infinite_id":
                with torch.no_grad():
                    self.embeddings[photo] = self.pipeline(checkpoint).face_features(Path(photo))
            else:
                self.embeddings[photo] = identity_from_images(self.analyzer, [Path(photo)])
        return self.embeddings[photo]

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [self.make(item["row"], item["checkpoint"], item["switches"]) for item in items]

    def make(self, row: dict[str, Any], checkpoint: str | None, switches: dict[str, Any]) -> StageOutput:
        import torch

        row = dict(row)
        image_file = row.pop("image_file", None)
        if row["source"] == "baseline":
            return self.read_baseline(row, image_file)
        try:
            identity = self.identity(row["photo"], checkpoint or "")
        except NoFaceError as error:  # the identity photo's fault: the row's reason
            row.update(
                status=Status.REJECTED.value,
                reject_reason=RejectReason.NO_FACE.value,
                reject_detail=str(error),
            )
            return StageOutput(row)
        generator = torch.Generator(self.device).manual_seed(row["seed"])
        pipeline = self.pipeline(checkpoint or "")
        if self.model.family == "infinite_id":
            image = self.infinite_id_image(pipeline, row["prompt"], identity, switches, generator)
        else:
            image = pipeline(row["prompt"], id_embedding=identity, generator=generator).images[0]
        return StageOutput(row, png_bytes(image), "png")

    def infinite_id_image(
        self, pipeline: Any, prompt: str, features: Any, switches: dict[str, Any], generator: Any
    ) -> Any:
        """An Infinite-ID image with ``model.infinite_id``'s inference switches, ``switches`` (an
        ablation's) applied, and ``model.inference``'s size, steps and guidance."""
        import torch

        settings = self.model.infinite_id.model_copy(update=switches)
        sampling = self.model.model_copy(update={"infinite_id": settings}).infinite_id_sampling()
        with torch.no_grad():
            tokens = pipeline.encode_identity(*features)
        return pipeline(prompt, id_embeddings=tokens, generator=generator, **sampling).images[0]

    @staticmethod
    def read_baseline(row: dict[str, Any], image_file: str | None) -> StageOutput:
        if image_file is None:
            row.update(
                status=Status.REJECTED.value,
                reject_reason=RejectReason.MISSING_IMAGE.value,
                reject_detail="the baseline's mapping places no image for this pair",
            )
            return StageOutput(row)
        data = Path(image_file).read_bytes()
        try:
            image = decode_image(data)
        except BadImageError as error:
            row.update(status=Status.REJECTED.value, reject_reason=error.reason, reject_detail=error.detail)
            return StageOutput(row)
        return StageOutput(row, png_bytes(image), "png")


def run_benchmark(config: InfuConfig) -> dict[str, Any]:
    """Make every benchmark image of every model version; returns the step's manifest."""
    settings: BenchmarkConfig = config.step(STEP)
    check_ablations(config)
    inputs = upstream_inputs(config, STEP)
    benchmark, identities, pair_list = benchmark_pairs(settings)
    tasks = benchmark_tasks(settings, inputs, pair_list)
    output = open_step_output(
        config, STEP, settings, **{model: str(inputs[model]) for model in settings.models}
    )
    phase = Phase(
        label=STEP,
        out_dir=output.out_dir,
        tasks=tasks,
        read_task=read_rows,
        stages=[
            stage(
                GenerateStage,
                model=config.model,
                face=config.face,
                device="cuda" if settings.resources.num_gpus > 0 else "cpu",
            )
        ],
        resources=settings.resources,
        extra_stats=output.shard_stats,
        table=IMAGES,
    )
    result = run_phase(phase)
    return output.complete(
        failed_shards=result.failed,
        run={STEP: result.as_dict()},
        benchmark={
            "version": benchmark.version,
            "fingerprint": benchmark.fingerprint(),
            "prompts": len(benchmark.prompts),
            "identities": len(identities),
            "pairs": len(pair_list),
        },
        models=[*settings.models, *settings.checkpoints, *settings.ablations, *settings.baselines],
        ablations={
            name: {"model": ablation.model, **ablation.switches()}
            for name, ablation in settings.ablations.items()
        },
    )
