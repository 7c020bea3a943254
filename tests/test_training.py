"""Stage-1 training: the data plan, the flow-matching objective, the Ray Train run (2 workers, gloo,
FSDP2) that learns, resumes exactly after a kill and exports a checkpoint the pipeline loads, and the
precompute step's cache, which trains to the same losses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from infu.captions import read_captions
from infu.config import load_config
from infu.model.factory import build_pipeline, load_infu
from infu.model.infu import InfU
from infu.shards import committed_shards, read_parquet_records
from infu.steps import StepError
from training.cache import EncodedCache, text_key
from training.config import DataConfig, TimestepConfig, TrainConfig
from training.data import TrainingSamples, cover_crop, scaled_bucket, worker_batches
from training.objective import FlowMatchingObjective, FrozenEncoders, sample_timesteps
from training.precompute import caption_texts, run_precompute, step_cache
from training.train import CHECKPOINTS_DIR, METRICS_FILE, VALIDATION_DIR, run_training

from .conftest import (
    EMBEDDED,
    assert_trains_as,
    copy_step_outputs,
    corpus_overrides,
    kill_step_job_midway,
    ray_unless_running,
    training_losses,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

LEARNING_STEPS = 200
RESUME_STEPS, KILL_AFTER = 20, 10


def test_global_batch_must_split_into_micro_batches_on_every_worker():
    with pytest.raises(ValueError, match=r"global_batch 6 is not a multiple .* 2 x resources.workers 2 = 4"):
        TrainConfig(global_batch=6, data=DataConfig(micro_batch=2), resources={"workers": 2})
    settings = TrainConfig(global_batch=16, data=DataConfig(micro_batch=2), resources={"workers": 2})
    assert settings.accumulation_steps() == 4 and settings.accumulation_steps(workers=8) == 1
    with pytest.raises(ValueError, match="fsdp is false with resources.workers 2: the workers would each"):
        TrainConfig(global_batch=16, data=DataConfig(micro_batch=2), fsdp=False, resources={"workers": 2})
    assert not TrainConfig(global_batch=4, fsdp=False, resources={"workers": 1}).fsdp


def test_buckets_scale_down_in_multiples_of_16_and_crops_cover_the_target():
    assert scaled_bucket(768, 1024, 64) == (48, 64)
    assert scaled_bucket(1024, 1024, None) == (1024, 1024) and scaled_bucket(64, 48, 128) == (64, 48)
    scale, left, top = cover_crop((200, 100), (64, 64))
    assert scale == pytest.approx(0.64) and (left, top) == pytest.approx((32.0, 0.0))
    # the keypoint at the photo's centre lands at the crop's centre
    assert (100 * scale - left, 50 * scale - top) == pytest.approx((32.0, 32.0))


def test_logit_normal_timesteps_have_the_configured_logit_moments():
    t = sample_timesteps(
        TimestepConfig(logit_mean=0.5, logit_std=0.8), 20_000, torch.Generator().manual_seed(0)
    )
    logits = torch.logit(t.double())
    assert 0 < t.min() and t.max() < 1
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03) and logits.std().item() == pytest.approx(
        0.8, abs=0.03
    )


@pytest.fixture(scope="module")
def samples(captioned_corpus) -> TrainingSamples:
    config, _ = captioned_corpus
    return TrainingSamples(
        config.step_dir("filter"),
        config.step_dir("caption"),
        DataConfig(micro_batch=2, max_side=64, control_dropout=0.0),
        config.model.projection.embedding_space,
        global_batch=4,
    )


def test_the_plan_batches_same_size_samples_once_per_epoch_and_resumes_at_any_position(samples):
    summary = samples.summary()
    assert summary["trainable_samples"] == 10 and summary["buckets"] == {"48x64": 10}
    assert summary["global_batches_per_epoch"] == 2 and summary["left_over_per_epoch"] == 2
    stream = samples.global_batches()
    first = [next(stream) for _ in range(8)]
    for epoch in range(4):
        batches = [batch for batch_epoch, batch in first if batch_epoch == epoch]
        keys = [ref.key for batch in batches for ref in batch]
        assert len(batches) == 2 and len(keys) == len(set(keys)) == 8
        assert {ref.size for batch in batches for ref in batch} == {(48, 64)}
    assert [batch for _, batch in first[:2]] != [batch for _, batch in first[2:4]], "epochs reshuffle"
    resumed = samples.global_batches(start=5)
    assert [next(resumed) for _ in range(3)] == first[5:8]


def test_a_worker_batch_holds_the_target_its_keypoint_control_caption_and_identity(samples):
    batch = next(worker_batches(samples, rank=1, world=2, start=0))
    _, planned = next(samples.global_batches())
    assert batch["keys"] == [ref.key for ref in planned[2:4]] and batch["position"] == 0
    alone = worker_batches(samples, rank=0, world=1, start=0)
    assert [next(alone)["keys"] for _ in range(2)] == [[ref.key for ref in planned[:2]], batch["keys"]]
    assert batch["pixels"].shape == batch["control"].shape == (2, 3, 64, 48)
    assert -1 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert batch["control"].amax(dim=(1, 2, 3)).gt(-1).all(), "keypoints drawn (no control dropout)"
    norms = batch["id_embedding"].norm(dim=-1)
    assert batch["id_embedding"].shape == (2, 128) and torch.allclose(norms, torch.ones(2))
    assert all(isinstance(prompt, str) for prompt in batch["prompts"])


def test_identity_enhanced_training_takes_the_reference_from_another_photo_of_the_identity(captioned_corpus):
    config, _ = captioned_corpus
    data = DataConfig(micro_batch=2, max_side=64, reference="same_identity", empty_prompts=True)
    samples = TrainingSamples(config.step_dir("filter"), config.step_dir("caption"), data, "dlib", 4)
    members = samples.identity_members()
    pairs = [refs for refs in members.values() if len(refs) == 2]
    assert len(pairs) == 3 and samples.summary()["samples_alone_in_their_identity"] == 4
    for first, second in pairs:
        assert samples.reference_of(first, 0) == second and samples.reference_of(second, 3) == first
    alone = next(refs[0] for refs in members.values() if len(refs) == 1)
    assert samples.reference_of(alone, 0) == alone
    target, reference = pairs[0]
    sample = samples.load(target, epoch=0)
    expected = samples.shard_records(reference.shard)[reference.key]["face_embedding"]
    assert torch.equal(sample["id_embedding"], torch.tensor(expected)) and sample["prompt"] == ""


def test_a_dataset_identity_label_decides_who_is_the_same_person_over_the_filter_clusters(
    captioned_corpus, tmp_path
):
    config, _ = captioned_corpus
    for step in ("filter", "caption"):
        shutil.copytree(config.step_dir(step), tmp_path / step)
    data = DataConfig(micro_batch=2, max_side=64, reference="same_identity", empty_prompts=True)
    clustered = TrainingSamples(tmp_path / "filter", tmp_path / "caption", data, "dlib", 4).identity_members()
    alone = [refs[0] for refs in clustered.values() if len(refs) == 1]
    paired = next(refs for refs in clustered.values() if len(refs) == 2)
    labels = {alone[0].key: "person-a", alone[1].key: "person-a", paired[0].key: "person-b"}
    for path in (tmp_path / "filter").glob("*.parquet"):
        table = pq.read_table(path)
        keys = table["key"].to_pylist()
        identity = [
            labels.get(key, old) for key, old in zip(keys, table["identity"].to_pylist(), strict=True)
        ]
        column = table.schema.get_field_index("identity")
        pq.write_table(table.set_column(column, "identity", pa.array(identity, pa.string())), path)
    samples = TrainingSamples(tmp_path / "filter", tmp_path / "caption", data, "dlib", 4)
    members = {
        identity: sorted(ref.key for ref in refs) for identity, refs in samples.identity_members().items()
    }
    assert members["sample/person-a"] == sorted([alone[0].key, alone[1].key])
    assert members["sample/person-b"] == [paired[0].key], "the label wins over the filter's cluster"
    by_key = {ref.key: ref for ref in samples.trainable()}
    assert samples.reference_of(by_key[alone[0].key], 0).key == alone[1].key
    assert samples.reference_of(by_key[paired[1].key], 0).key == paired[1].key, "its cluster-mate left"


def test_a_dataset_no_bucket_can_batch_is_refused_before_training(captioned_corpus):
    config, _ = captioned_corpus
    samples = TrainingSamples(
        config.step_dir("filter"), config.step_dir("caption"), DataConfig(max_side=64), "dlib", 11
    )
    message = r"no aspect-ratio bucket holds 11 trainable samples \(global_batch\); .*\(48, 64\): 10"
    with pytest.raises(StepError, match=message):
        samples.summary()
    with pytest.raises(StepError, match=message):
        next(samples.global_batches())


def test_identity_embeddings_of_another_space_are_refused(captioned_corpus):
    config, _ = captioned_corpus
    samples = TrainingSamples(
        config.step_dir("filter"), config.step_dir("caption"), DataConfig(), "arcface_ir_se50", global_batch=4
    )
    with pytest.raises(
        StepError, match="has a dlib face embedding, but the projection takes arcface_ir_se50"
    ):
        samples.summary()


def test_only_infusenet_and_projection_get_gradients_from_the_velocity_loss(samples):
    config = load_config(EMBEDDED)
    pipeline = build_pipeline(config.model)
    infu = InfU(pipeline.image_proj, pipeline.infusenet)
    pipeline.transformer.requires_grad_(False)
    objective = FlowMatchingObjective(pipeline, infu, config.step("stage1"), max_sequence_length=32)
    batch = next(worker_batches(samples, rank=0, world=1, start=0))
    loss = objective.loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() == objective.loss(batch, torch.Generator().manual_seed(0)).item()
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert all(param.grad is None for param in pipeline.transformer.parameters())
    assert all(
        param.grad is None for model in (pipeline.vae, pipeline.text_encoder) for param in model.parameters()
    )
    assert all(param.grad is not None for param in infu.parameters())
    # the InfuseNet's output layers start at zero: at step 0 only they move, then the rest follows
    assert pipeline.infusenet.controlnet_blocks[0].weight.grad.abs().sum() > 0


def copy_inputs(source: Path, dest: Path) -> None:
    copy_step_outputs(source, dest, ("ingest", "filter", "caption"))


def saved_checkpoints(folder: Path) -> int:
    return len(list((folder / CHECKPOINTS_DIR).glob("step_*/.metadata")))


@pytest.fixture(scope="module")
def trained(captioned_corpus, tmp_path_factory):
    """200 uninterrupted steps on 2 Ray Train workers: ``(config, manifest)``."""
    config, _ = captioned_corpus
    run_dir = tmp_path_factory.mktemp("trained")
    copy_inputs(config.run.run_dir, run_dir)
    overrides = [f"stage1.steps={LEARNING_STEPS}", "stage1.validation.every=100"]
    trained_config = load_config(EMBEDDED, [*corpus_overrides(run_dir), *overrides])
    with ray_unless_running():
        return trained_config, run_training(trained_config, "stage1")


def test_two_fsdp_workers_learn_over_200_steps(trained):
    config, manifest = trained
    curve = training_losses(config.run.run_dir)
    assert sorted(curve) == list(range(1, LEARNING_STEPS + 1))
    first, last = (
        np.mean([curve[step] for step in range(1, 31)]),
        np.mean([curve[step] for step in range(171, 201)]),
    )
    assert last < 0.85 * first, (first, last)
    assert manifest["status"] == "complete" and manifest["steps"] == LEARNING_STEPS
    assert manifest["resumed_from_step"] is None
    assert manifest["counts"] == {"steps": LEARNING_STEPS, "samples_seen": LEARNING_STEPS * 4}
    assert manifest["data"]["trainable_samples"] == 10
    kept = sorted(path.name for path in (config.step_dir("stage1") / CHECKPOINTS_DIR).glob("step_*"))
    assert kept == ["step_000000150", "step_000000200"], "checkpoint.keep: 2"
    assert (config.step_dir("stage1") / "tensorboard").is_dir()


def test_validation_images_show_the_fixed_identities_as_training_goes(trained):
    config, _ = trained
    folder = config.step_dir("stage1") / VALIDATION_DIR
    assert sorted(path.name for path in folder.iterdir()) == ["step_000000100", "step_000000200"]
    names = ["identity0_prompt0.png", "identity1_prompt0.png"]
    assert sorted(path.name for path in (folder / "step_000000200").iterdir()) == names
    steps = ("step_000000100", "step_000000200")
    halfway, last = (np.asarray(Image.open(folder / step / names[0])) for step in steps)
    assert halfway.shape == (128, 96, 3) and not np.array_equal(halfway, last)


def test_the_export_is_the_trained_model_in_the_released_layout_and_generates(trained, tmp_path):
    config, manifest = trained
    export = Path(manifest["export"])
    assert (export / "infu_flux_v1.0" / "aes_stage2" / "InfuseNetModel" / "config.json").is_file()
    exported = InfU.from_pretrained(export, "aes_stage2", config.model.projection)
    fresh = load_infu(config.model, build_pipeline(config.model).transformer, torch.float32)
    zero_init = exported.infusenet.controlnet_blocks[0].weight
    assert zero_init.abs().sum() > 0 and fresh.infusenet.controlnet_blocks[0].weight.abs().sum() == 0
    from infu.model.cli import generate

    photo = Path(pytest.importorskip("skimage.data").__file__).parent / "astronaut.png"
    generating = load_config(EMBEDDED, [f"model.infu_model={export}"])
    written = generate(generating, [photo], "a portrait", tmp_path / "out.png", seed=0)
    assert Image.open(written).size == (96, 128)


def test_one_worker_accumulating_trains_as_two_fsdp_workers_do(trained, tmp_path):
    config, _ = trained
    copy_inputs(config.run.run_dir, tmp_path)
    single = load_config(
        EMBEDDED,
        [*corpus_overrides(tmp_path), "stage1.steps=5", "stage1.resources.workers=1"],
    )
    assert single.stage1.accumulation_steps() == 2 and config.stage1.accumulation_steps() == 1
    assert_trains_as(single, config.run.run_dir)


def test_a_killed_run_resumes_to_the_uninterrupted_losses(trained, tmp_path):
    config, _ = trained
    copy_inputs(config.run.run_dir, tmp_path)
    overrides = [
        *corpus_overrides(tmp_path),
        f"stage1.steps={RESUME_STEPS}",
        f"stage1.checkpoint.every={KILL_AFTER}",
    ]
    out_dir = tmp_path / "stage1"
    saved = kill_step_job_midway("stage1", EMBEDDED, overrides, out_dir, after=1, count=saved_checkpoints)
    assert saved == 1 and not (out_dir / "export").exists(), "killed after the first checkpoint"
    resumed = load_config(EMBEDDED, overrides)
    with ray_unless_running():
        manifest = run_training(resumed, "stage1")
    assert manifest["resumed_from_step"] == KILL_AFTER
    uninterrupted = training_losses(config.run.run_dir)
    assert training_losses(tmp_path) == {step: uninterrupted[step] for step in range(1, RESUME_STEPS + 1)}


# the precompute step: stage 1's frozen-encoder outputs cached once


@pytest.fixture(scope="module")
def precomputed(trained, tmp_path_factory):
    """The trained run's inputs with the precompute step run over them: ``(config, manifest)``."""
    config, _ = trained
    run_dir = tmp_path_factory.mktemp("precomputed")
    copy_inputs(config.run.run_dir, run_dir)
    cached = load_config(
        EMBEDDED, [*corpus_overrides(run_dir), "stage1.steps=3", "stage1.validation.every=null"]
    )
    with ray_unless_running():
        return cached, run_precompute(cached)


def encoders_of(config) -> FrozenEncoders:
    return FrozenEncoders(build_pipeline(config.model), config.model.inference.max_sequence_length)


def test_the_precompute_step_caches_each_trainable_sample_with_its_captions(precomputed):
    config, manifest = precomputed
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 10
    encoders = encoders_of(config)
    cache = EncodedCache(config.step_dir("precompute"), encoders.latent_encoder, encoders.text_encoder)
    captions = read_captions(config.step_dir("caption"))
    rows = [row for shard in sorted(cache.shards) for row in cache.rows(shard).values()]
    assert len(rows) == 10 and {(row["width"], row["height"]) for row in rows} == {(48, 64)}
    assert {row["latent_encoder"] for row in rows} == {encoders.latent_encoder}
    for row in rows:
        assert row["texts"] == [text_key(text) for text in caption_texts(captions[row["key"]])]
    assert sum(len(row["texts"]) for row in rows) >= 20, "several captions per sample"


def test_a_cache_entry_serves_only_the_same_image_bytes_size_and_encoders(precomputed):
    config, _ = precomputed
    encoders = encoders_of(config)
    folder = config.step_dir("precompute")
    shard = committed_shards(folder)[0]
    record = read_parquet_records(config.step_dir("filter") / f"{shard}.parquet")[0]
    cache = EncodedCache(folder, encoders.latent_encoder, encoders.text_encoder)
    entry = cache.entry(shard, record, (48, 64))
    assert entry.latent.shape == entry.control.shape == (32, 8, 6) and entry.texts
    assert cache.entry(shard, record, (32, 48)) is None, "another size"
    assert cache.entry(shard, {**record, "sha256": "0" * 64}, (48, 64)) is None, "other image bytes"
    other_vae = EncodedCache(folder, "another-vae", encoders.text_encoder).entry(shard, record, (48, 64))
    assert other_vae.latent is None and other_vae.texts.keys() == entry.texts.keys()
    assert EncodedCache(folder, "another-vae", "other-text").entry(shard, record, (48, 64)) is None


def test_cached_encodings_give_the_losses_of_encoding_live(precomputed):
    config, _ = precomputed
    pipeline = build_pipeline(config.model)
    objective = FlowMatchingObjective(
        pipeline, InfU(pipeline.image_proj, pipeline.infusenet), config.step("stage1"), max_sequence_length=32
    )
    data = DataConfig(micro_batch=2, max_side=64, control_dropout=0.5)
    live, cached = (
        TrainingSamples(config.step_dir("filter"), config.step_dir("caption"), data, "dlib", 4)
        for _ in range(2)
    )
    cached.use_cache(step_cache(config, {"filter": config.step_dir("filter")}, objective.encoders))
    live_batches, cached_batches = worker_batches(live, 0, 1, 0), worker_batches(cached, 0, 1, 0)
    black_controls = empty_prompts = 0
    for index in range(10):
        live_batch, cached_batch = next(live_batches), next(cached_batches)
        assert "pixels" in live_batch and "pixels" not in cached_batch and "latent_parameters" in cached_batch
        assert live_batch["keys"] == cached_batch["keys"] and live_batch["prompts"] == cached_batch["prompts"]
        black_controls += sum(control is None for control in cached_batch["control_parameters"])
        empty_prompts += sum(text is None for text in cached_batch["text"])
        with torch.no_grad():
            expected = objective.loss(live_batch, torch.Generator().manual_seed(index)).item()
            assert objective.loss(cached_batch, torch.Generator().manual_seed(index)).item() == pytest.approx(
                expected, rel=1e-5
            )
    assert black_controls > 0 and empty_prompts > 0, "control dropout and empty captions were exercised"


@pytest.mark.slow  # the flow test sees stage 1 read the cache; the losses are compared in-process above
def test_stage1_reads_the_cache_and_trains_as_it_does_without(precomputed, trained):
    config, _ = precomputed
    with ray_unless_running():
        run_training(config, "stage1")
    rows = [json.loads(line) for line in (config.step_dir("stage1") / METRICS_FILE).read_text().splitlines()]
    assert [row["cached_share"] for row in rows] == [1.0, 1.0, 1.0]
    uncached = [
        json.loads(line) for line in (trained[0].step_dir("stage1") / METRICS_FILE).read_text().splitlines()
    ]
    assert {row["cached_share"] for row in uncached} == {0.0}
    for row in rows:
        assert row["loss"] == pytest.approx(uncached[row["step"] - 1]["loss"], rel=1e-5), row["step"]
