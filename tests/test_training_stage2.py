"""Stage-2 training (SFT on SPMS pairs): the pair data path through the stage-1 planner and loader, the
stage2 section's rules, and a short Ray Train run (2 workers) that starts from the stage-1 export."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from infu.config import ConfigError, load_config
from infu.lineage import upstream_inputs
from infu.manifest import trained_export
from infu.model.factory import build_pipeline, load_infu
from infu.model.infu import InfU
from infu.pairs import read_pair_records, read_reference
from infu.shards import TarReader, committed_shards
from infu.steps import StepError, get_step
from training.config import PairTrainConfig
from training.data import PairSamples, step_samples, to_pixels
from training.train import METRICS_FILE, VALIDATION_DIR, initial_checkpoint, run_training

from .conftest import EMBEDDED, copy_step_outputs, ray_unless_running, spms_overrides

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

RUN_STEPS = 4
TINY_LR = 1e-9
"""AdamW moves each weight by about ``lr`` per step: the export stays at the weights training started from."""
UPSTREAM = ("ingest", "filter", "caption", "stage1", "synth", "spms")


def test_stage2_is_a_registered_step_reading_stage1_and_the_pairs():
    spec = get_step("stage2")
    assert spec.upstream == ("stage1", "spms") and spec.section_model is PairTrainConfig
    assert spec.job_arguments() == ["-m", "training", "stage2"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage2.data.reference=same_identity", r"data.reference is 'same_identity', but a pair's identity"),
        ("stage2.data.mixture.empty_rate=0.2", r"data.mixture is set, but a pair's caption is the prompt"),
    ],
)
def test_stage1_only_data_settings_are_refused_in_stage2(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EMBEDDED, [override])
    load_config(EMBEDDED, [override.replace("stage2.", "stage1.")])  # stage 1's to set


def test_stage2_starts_from_an_explicit_init_or_else_needs_a_completed_stage1(tmp_path):
    config = load_config(EMBEDDED, [f"run.run_dir={tmp_path}"])
    with pytest.raises(StepError, match=f"no completed export in {tmp_path / 'stage1'}: run the stage1 step"):
        run_training(config, "stage2")
    assert not (tmp_path / "stage2").exists(), "refused before anything is written"
    explicit = PairTrainConfig(init=tmp_path / "elsewhere", global_batch=4, data={"micro_batch": 2})
    assert initial_checkpoint(explicit, upstream_inputs(config, "stage2")) == tmp_path / "elsewhere"


@pytest.fixture(scope="module")
def pair_run(spms_pairs, tmp_path_factory):
    """The session's SPMS run folder copied (stage 2 writes into the copy): ``(config, spms manifest)``."""
    source, _, spms_manifest = spms_pairs
    run_dir = tmp_path_factory.mktemp("stage2")
    copy_step_outputs(source.run.run_dir, run_dir, UPSTREAM)
    overrides = [
        f"stage2.steps={RUN_STEPS}",
        f"stage2.optimizer.lr={TINY_LR}",
        f"stage2.checkpoint.every={RUN_STEPS}",
        f"stage2.validation.every={RUN_STEPS}",
    ]
    return load_config(EMBEDDED, [*spms_overrides(run_dir), *overrides]), spms_manifest


@pytest.fixture(scope="module")
def pair_samples(pair_run) -> PairSamples:
    config, _ = pair_run
    settings = config.stage2.model_copy(
        update={"data": config.stage2.data.model_copy(update={"control_dropout": 0})}
    )
    samples = step_samples(
        upstream_inputs(config, "stage2"), settings, config.model.projection.embedding_space
    )
    assert isinstance(samples, PairSamples)
    return samples


def kept_pairs(spms_dir: Path) -> dict[str, dict]:
    """The kept pair rows of the spms shards by key, with the shard tar holding their images."""
    rows = {}
    for shard in committed_shards(spms_dir):
        for row in read_pair_records(spms_dir / f"{shard}.parquet"):
            if row["status"] == "ok":
                rows[row["key"]] = {**row, "tar": spms_dir / f"{shard}.tar"}
    return rows


def test_the_stage2_plan_batches_exactly_the_kept_pairs(pair_run, pair_samples):
    config, spms_manifest = pair_run
    kept = kept_pairs(config.step_dir("spms"))
    bucketed = {key for key, row in kept.items() if row["bucket_width"] is not None}
    assert len(kept) == spms_manifest["counts"]["ok"]
    summary = pair_samples.summary()
    assert summary["trainable_samples"] == len(bucketed) >= config.stage2.global_batch
    assert {ref.key for ref in pair_samples.trainable()} == bucketed
    stream = pair_samples.global_batches()
    first_epoch = [next(stream) for _ in range(summary["global_batches_per_epoch"])]
    keys = [ref.key for epoch, batch in first_epoch for ref in batch if epoch == 0]
    assert len(keys) == len(set(keys)) == summary["global_batches_per_epoch"] * config.stage2.global_batch
    assert set(keys) <= bucketed and len(keys) + summary["left_over_per_epoch"] == len(bucketed)


def test_a_pair_sample_is_the_synthetic_image_with_the_real_references_identity_and_its_prompt(
    pair_run, pair_samples
):
    config, _ = pair_run
    kept = kept_pairs(config.step_dir("spms"))
    ref = sorted(pair_samples.trainable(), key=lambda ref: ref.key)[0]
    row = kept[ref.key]
    sample = pair_samples.load(ref, epoch=0)
    tar = TarReader(row["tar"])
    synthetic = Image.open(io.BytesIO(tar.read(f"{ref.key}.png"))).convert("RGB")
    reference = Image.open(io.BytesIO(read_reference(tar, row))).convert("RGB")
    width, height = ref.size
    assert sample["pixels"].shape == (3, height, width)
    as_target = [
        to_pixels(ImageOps.fit(image, ref.size, Image.Resampling.BICUBIC)) for image in (synthetic, reference)
    ]
    from_synthetic, from_reference = ((sample["pixels"] - pixels).abs().mean().item() for pixels in as_target)
    assert from_synthetic < 0.02 < from_reference, (from_synthetic, from_reference)

    batch = pair_samples.batch([ref], epoch=0)
    unit = torch.nn.functional.normalize
    expected = unit(torch.tensor([row["reference_embedding"]]), dim=-1)
    own_face = unit(torch.tensor([row["face_embedding"]]), dim=-1)
    assert torch.allclose(batch["id_embedding"], expected, atol=1e-6)
    assert not torch.allclose(batch["id_embedding"], own_face, atol=1e-4), "not the synthetic face's own"
    assert sample["prompt"] == row["prompt"] and row["prompt"]

    # the control draws the synthetic face's keypoints, scaled to the bucket
    kps = np.asarray(row["faces"][0]["keypoints"]).reshape(5, 2) * (width / row["width"])
    x, y = np.clip(np.round(kps[0]).astype(int), 0, [width - 1, height - 1])
    assert sample["control"][:, y, x].max() > -1


def test_a_short_stage2_run_starts_from_the_stage1_export_and_exports_in_the_released_layout(
    pair_run, pair_samples
):
    config, _ = pair_run
    with ray_unless_running():
        manifest = run_training(config, "stage2")
    out_dir = config.step_dir("stage2")
    stage1_export = trained_export(config.step_dir("stage1"))  # this run folder's, not the copied manifest's
    assert manifest["status"] == "complete" and manifest["steps"] == RUN_STEPS
    assert manifest["inputs"] == {name: str(config.step_dir(name)) for name in ("stage1", "spms")}
    assert manifest["init"] == str(stage1_export)
    assert manifest["data"]["trainable_samples"] == pair_samples.summary()["trainable_samples"]
    lines = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, RUN_STEPS + 1))
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in lines)
    validation = out_dir / VALIDATION_DIR / f"step_{RUN_STEPS:09d}"
    assert sorted(path.name for path in validation.iterdir()) == [
        "identity0_prompt0.png",
        "identity1_prompt0.png",
    ]

    export = Path(manifest["export"])
    version, projection = config.model.infu_version, config.model.projection
    assert (export / "infu_flux_v1.0" / version / "InfuseNetModel" / "config.json").is_file()
    trained = InfU.from_pretrained(export, version, projection).state_dict()
    initial = InfU.from_pretrained(stage1_export, version, projection).state_dict()
    fresh = load_infu(config.model, build_pipeline(config.model).transformer, torch.float32).state_dict()
    assert trained.keys() == initial.keys() == fresh.keys()

    def largest_change(before: dict, after: dict) -> float:
        return max((after[name] - before[name]).abs().max().item() for name in before)

    # each step moves a weight by about lr: the run started from the stage-1 export, not from the base
    assert 0 < largest_change(initial, trained) < 10 * RUN_STEPS * TINY_LR
    assert largest_change(fresh, initial) > 1e-5, "stage 1 moved the weights far more than that"
    from infu.model.cli import generate

    photo = Path(pytest.importorskip("skimage.data").__file__).parent / "astronaut.png"
    generating = load_config(EMBEDDED, [f"model.infu_model={export}"])
    written = generate(generating, [photo], "a portrait", config.run.run_dir / "generated.png", seed=0)
    assert Image.open(written).size == (96, 128)  # the export loads in `infu generate`
