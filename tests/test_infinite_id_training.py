"""Infinite-ID's identity-enhanced training through the training step (``model.family: infinite_id``):
the samples' reference faces, the adapter-only objective with the text cross-attention off, the whole
``configs/infinite-id-embedded.yaml`` pipeline (training on 2 Ray Train workers with FSDP2, then the
benchmark with its ablations and the scores), the export, and worker-count invariance and exact resume.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infu.config import load_config
from infu.lineage import upstream_inputs
from infu.manifest import read_manifest
from infu.model.infinite_id import InfiniteIdAdapter
from infu.steps import StepError
from training.data import step_samples, worker_batches
from training.family import InfiniteIdFamily
from training.train import CHECKPOINTS_DIR, VALIDATION_DIR, run_training

from .conftest import (
    INFINITE_ID_EMBEDDED,
    assert_trains_as,
    copy_step_outputs,
    corpus_overrides,
    kill_step_job_midway,
    ray_unless_running,
    training_losses,
)
from .prefect_server import BIN, PROJECT_ROOT

LEARNING_STEPS = 200
ABLATIONS = ("stage1-mutual", "stage1-adain", "stage1-plain")
DATA_STEPS = ("ingest", "filter", "caption")


def infinite_id_overrides(run_dir: Path) -> list[str]:
    """The whole Infinite-ID pipeline in ``run_dir`` on the test corpus, with a quick benchmark."""
    return [
        *corpus_overrides(run_dir),
        f"benchmark.identities={run_dir / 'corpus'}",
        "benchmark.prompts_per_tag=1",
        "eval.fid=false",
        "eval.lpips=null",
    ]


@pytest.fixture(scope="module")
def identity_config(captioned_corpus):
    """The Infinite-ID config over the session's captioned corpus (same data-step identities)."""
    config, _ = captioned_corpus
    return load_config(INFINITE_ID_EMBEDDED, infinite_id_overrides(config.run.run_dir))


@pytest.fixture(scope="module")
def family_models(identity_config):
    """The tiny Infinite-ID models as one training worker builds them (no process group: unsharded)."""
    return InfiniteIdFamily().build(identity_config, identity_config.stage1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def identity_samples(identity_config, family_models):
    settings = identity_config.stage1
    family = InfiniteIdFamily()
    return step_samples(
        upstream_inputs(identity_config, "stage1"),
        settings,
        family.embedding_space(identity_config),
        family.reference_faces(family_models),
    )


def test_a_sample_carries_the_aligned_face_of_another_photo_of_its_identity(identity_samples):
    members = identity_samples.identity_members()
    target, other = next(refs for refs in members.values() if len(refs) == 2)
    sample = identity_samples.load(target, epoch=0)
    assert sample["prompt"] == "", "no text in identity-enhanced training"
    assert torch.equal(sample["reference_face"], identity_samples.reference_face(other))
    assert not torch.equal(sample["reference_face"], identity_samples.reference_face(target))
    assert sample["reference_face"].shape == (3, 224, 224)
    assert 0 <= sample["reference_face"].min() and sample["reference_face"].max() <= 1
    # an aligned face crop: the face fills it (the ArcFace template's corners are black only when the
    # face is at the photo's border)
    assert sample["reference_face"][:, 80:150, 80:150].mean() > 0.1
    batch = next(worker_batches(identity_samples, rank=0, world=1, start=0))
    assert batch["reference_face"].shape == (2, 3, 224, 224) and batch["id_embedding"].shape == (2, 128)


def test_the_text_cross_attention_gets_no_signal_and_the_adapter_alone_descends(
    family_models, identity_samples
):
    models = family_models
    unet, objective = models.model.unet, models.objective
    text_projections = [
        projection
        for name, module in unet.named_modules()
        if name.endswith("attn2")
        for projection in (module.to_k, module.to_v)
    ]
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in text_projections]
    for layer in text_projections:
        layer.requires_grad_(True)  # would get a gradient, were the text attended to
    self_attention = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    self_attention.requires_grad_(True)
    batch = next(worker_batches(identity_samples, rank=0, world=1, start=0))
    try:
        loss = objective.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        unet.requires_grad_(False)
        models.model.adapter.requires_grad_(True)
    adapter = models.model.adapter
    assert len(text_projections) == 2 * len(adapter.identity_kv) == 22  # the tiny UNet's 11 attn2 layers
    assert calls == [], "the text keys and values are never computed"
    assert all(layer.weight.grad is None for layer in text_projections)
    assert self_attention.weight.grad.abs().sum() > 0, "the UNet's own layers do get a signal"
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in adapter.parameters())
    assert math.isfinite(loss.item())

    # the adapter alone fits one batch's draws (fixed noise and timesteps): the gradients descend
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    fitted = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = objective.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        fitted.append(loss.item())
    assert np.mean(fitted[-10:]) < 0.9 * np.mean(fitted[:10]), fitted


def test_settings_of_the_other_family_are_refused_before_training(identity_config):
    family = InfiniteIdFamily()
    for override, message in (
        ("stage1.data.control_dropout=0.2", r"data.control_dropout do\(es\) not apply to model.family"),
        ("stage1.infusenet_guidance_scale=2", "infusenet_guidance_scale do"),
        ("stage1.data.empty_prompts=false", "has no text prompt: set data.empty_prompts: true"),
    ):
        config = load_config(INFINITE_ID_EMBEDDED, [f"run.run_dir={identity_config.run.run_dir}", override])
        with pytest.raises(StepError, match=message):
            family.check(config, "stage1")
        with pytest.raises(StepError, match=message):
            run_training(config, "stage1")
    family.check(identity_config, "stage1")
    with pytest.raises(StepError, match="stage2: SPMS pairs train InfU only; model.family is infinite_id"):
        family.check(identity_config, "stage2")


@pytest.fixture(scope="module")
def pipeline_run(captioned_corpus, tmp_path_factory):
    """``infu run --config configs/infinite-id-embedded.yaml`` over a copy of the captioned corpus: the data
    steps are complete already (same identities), so the run trains stage 1 (200 steps, 2 workers),
    then makes the benchmark with its ablations and scores it, each step a Ray job."""
    import subprocess

    config, _ = captioned_corpus
    run_dir = tmp_path_factory.mktemp("infinite_id_run")
    copy_step_outputs(config.run.run_dir, run_dir, DATA_STEPS)
    overrides = infinite_id_overrides(run_dir)
    command = [str(BIN / "infu"), "run", "--config", str(INFINITE_ID_EMBEDDED)]
    command += [argument for override in overrides for argument in ("--set", override)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return load_config(INFINITE_ID_EMBEDDED, overrides), output


def test_the_pipeline_trains_infinite_id_by_config_on_two_fsdp_workers(pipeline_run):
    config, output = pipeline_run
    for step in DATA_STEPS:
        assert f"{step}: complete already, skipped" in output
    manifest = read_manifest(config.step_dir("stage1"))
    assert manifest["status"] == "complete" and manifest["steps"] == LEARNING_STEPS
    assert manifest["data"]["trainable_samples"] == 10
    assert manifest["data"]["samples_alone_in_their_identity"] == 4
    curve = training_losses(config.run.run_dir)
    assert sorted(curve) == list(range(1, LEARNING_STEPS + 1))
    # noise prediction through a random frozen UNet sits at the noise floor, E[e^2] = 1: only the
    # adapter trains and a random base is no denoiser it can steer (see the README)
    assert 0.8 < np.mean(list(curve.values())) < 1.2
    kept = sorted(path.name for path in (config.step_dir("stage1") / CHECKPOINTS_DIR).glob("step_*"))
    assert kept == ["step_000000100", "step_000000200"]
    validation = config.step_dir("stage1") / VALIDATION_DIR
    halfway, last = (
        np.asarray(Image.open(validation / step / "identity0_prompt0.png"))
        for step in ("step_000000100", "step_000000200")
    )
    assert halfway.shape == (128, 96, 3) and not np.array_equal(halfway, last), "the adapter changed"


def test_the_training_lowers_the_objective_on_the_same_draws(pipeline_run):
    """The loss falls: the objective over the training samples, on the same fixed draws (noise, timesteps,
    VAE samples) for the fresh and the trained adapter, so no draw luck enters the comparison."""
    config, _ = pipeline_run
    family, export = InfiniteIdFamily(), Path(read_manifest(config.step_dir("stage1"))["export"])
    objective = {}
    for name, init in (("fresh", None), ("trained", export)):
        models = family.build(config, config.stage1, torch.device("cpu"), init)
        samples = step_samples(
            upstream_inputs(config, "stage1"),
            config.stage1,
            family.embedding_space(config),
            family.reference_faces(models),
        )
        batches = worker_batches(samples, rank=0, world=1, start=0)
        with torch.no_grad():
            objective[name] = np.array(
                [
                    models.objective.loss(next(batches), torch.Generator().manual_seed(seed)).item()
                    for seed in range(20)
                ]
            )
    fall = objective["fresh"] - objective["trained"]
    # measured: 1.071 -> 1.015 over 50 batches, 98% of them lower: the adapter sheds the excess its
    # random initial identity attention adds above the noise floor (see the README)
    assert fall.mean() > 0.03 * objective["fresh"].mean(), objective
    assert (fall > 0).mean() >= 0.8, fall


def test_the_export_is_an_adapter_folder_that_generates(pipeline_run, tmp_path):
    config, _ = pipeline_run
    export = Path(read_manifest(config.step_dir("stage1"))["export"])
    trained = InfiniteIdAdapter.from_pretrained(export)
    fresh = InfiniteIdFamily().build(config, config.stage1, torch.device("cpu"), None).model.adapter
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    moved = [
        key for key, value in trained.state_dict().items() if not torch.equal(value, fresh.state_dict()[key])
    ]
    assert len(moved) == len(fresh.state_dict()), "every trained tensor moved from its initial value"
    from infu.model.cli import generate

    photo = Path(pytest.importorskip("skimage.data").__file__).parent / "astronaut.png"
    images = []
    for adapter in (export, None):
        generating = load_config(INFINITE_ID_EMBEDDED, [f"model.infinite_id.adapter={adapter or 'null'}"])
        out = tmp_path / f"{'trained' if adapter else 'fresh'}.png"
        images.append(np.asarray(Image.open(generate(generating, [photo], "a portrait", out, seed=0))))
    assert images[0].shape == (128, 96, 3) and not np.array_equal(*images)


def test_the_pipeline_evaluates_the_trained_adapter_and_its_ablations(pipeline_run):
    config, _ = pipeline_run
    benchmark = read_manifest(config.step_dir("benchmark"))
    assert benchmark["status"] == "complete"
    assert benchmark["models"] == ["stage1", *ABLATIONS]
    summary = read_manifest(config.step_dir("eval"))
    assert summary["status"] == "complete"
    report = (config.step_dir("eval") / "report" / "report.md").read_text()
    for version in ("stage1", *ABLATIONS):
        assert f"| {version} |" in report
    assert "| Infinite-ID (paper) |" in report and "0.913" in report


def test_one_worker_accumulating_trains_as_two_fsdp_workers_do(pipeline_run, tmp_path):
    config, _ = pipeline_run
    copy_step_outputs(config.run.run_dir, tmp_path, DATA_STEPS)
    single = load_config(
        INFINITE_ID_EMBEDDED,
        [*infinite_id_overrides(tmp_path), "stage1.steps=5", "stage1.resources.workers=1"],
    )
    assert_trains_as(single, config.run.run_dir)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_losses(pipeline_run, tmp_path):
    config, _ = pipeline_run
    copy_step_outputs(config.run.run_dir, tmp_path, DATA_STEPS)
    overrides = [
        *infinite_id_overrides(tmp_path),
        "stage1.steps=20",
        "stage1.checkpoint.every=10",
        "stage1.validation.every=null",
    ]
    out_dir = tmp_path / "stage1"

    def saved(folder: Path) -> int:
        return len(list((folder / CHECKPOINTS_DIR).glob("step_*/.metadata")))

    saved_checkpoints = kill_step_job_midway("stage1", INFINITE_ID_EMBEDDED, overrides, out_dir, 1, saved)
    assert saved_checkpoints == 1 and not (out_dir / "export").exists(), "killed after the first checkpoint"
    with ray_unless_running():
        manifest = run_training(load_config(INFINITE_ID_EMBEDDED, overrides), "stage1")
    assert manifest["resumed_from_step"] == 10
    uninterrupted = training_losses(config.run.run_dir)
    assert training_losses(tmp_path) == {step: uninterrupted[step] for step in range(1, 21)}
