"""SPMS synthesis throughput: the synth step's Ray job vs a bare loop of its stages, and the GPU cost of the
paper's ~2M kept SPMS pairs.

Run: .venv/bin/python bench/datagen_bench.py [--copies 4] [--samples-per-reference 4] [--rounds 3]
     [--keep-rate 0.5] [--gpu-seconds-per-image S] [--overhead-seconds-per-image 0.3] [--gpus 64]
     [--measure-keep-rate]
Setup, once: the sample corpus (``--copies`` times; every copy after the first framed in a seeded border
so that the filter's duplicate rule keeps it) is ingested and filtered, and an untrained stage-1 export of
the tiny InfU is written as the stage1 step writes it (released layout, complete manifest): synthesis
costs the same whatever the weights. Both sides then make the same samples from the same references with
the same tiny models, one thread per worker: the synth step (``datagen.synth.run_synth``, in process, on a
local Ray) and a bare loop over the same stages (reference -> generate -> swap) in a fresh spawned process
per worker, imports and model loading included as a Ray worker's are. ``photo_share`` is 0, so every
sample is a generation. Prints samples/s of the Ray job / samples/s of the loop (goal >= 0.9) and the
job's extra seconds, medians of alternating rounds. Then the GPU-hours of 2M kept pairs: samples to
generate = 2M / keep rate (an assumption: the tiny model paints noise, so its keep rate says nothing),
times the GPU seconds of one FLUX.1-dev + InfuseNet generation at 1024 x 1024, 30 steps (by default the
planner's FLOP count at an assumed MFU; pass a measured figure once there is one) plus swap and SPMS filter.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image, ImageOps

# What the spawned loop processes import again (as __mp_main__): no more than a synth worker needs; the
# setup's imports (corpus, ingest, filter) are local to it.
from datagen.synth import run_synth, synth_phase
from infu.config import InfuConfig, load_config
from infu.manifest import open_step_output, read_manifest
from infu.raycluster import start_local_ray
from infu.runner import batched, run_reduce

ROOT = Path(__file__).resolve().parents[1]
PAPER_PAIRS = 2_000_000
PAPER_SIDE, PAPER_STEPS = 1024, 30
JPEG_MARGIN = 2
"""Extra pHash bits a framed copy must differ by: its JPEG re-encoding may move a hash bit or two."""


def framed(photo: Image.Image, seed: int) -> Image.Image:
    """``photo`` in a border of a seeded, smooth random colour field (the face itself is untouched)."""
    rng = np.random.default_rng(seed)
    border = max(photo.size) // 8
    levels = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    canvas = levels.resize((photo.width + 2 * border, photo.height + 2 * border), Image.Resampling.BILINEAR)
    canvas.paste(photo, (border, border))
    return canvas


def distinct_copies(images: Path, copies: int, max_distance: int) -> None:
    """Frame every copy after the first (``corpus_copies`` names them ``<copy>_<name>``) until its pHash is
    more than ``max_distance`` (+ a margin) from the original's and every other copy's: exact copies would
    all be the filter's ``duplicate`` rejects, and the synth step reads kept portraits only."""
    from filtering.dedup import hamming, phash

    for original in sorted(images.glob("0_*")):
        name = original.name.removeprefix("0_")
        with Image.open(original) as image:
            photo = ImageOps.exif_transpose(image).convert("RGB")
        hashes = [phash(photo)]
        seed = 0
        for copy in range(1, copies):
            (images / f"{copy}_{name}").unlink()
            target = images / f"{copy}_{Path(name).stem}.jpg"
            while True:
                seed += 1
                framed(photo, seed).save(target, quality=95)
                with Image.open(target) as written:
                    candidate = phash(written.convert("RGB"))
                if all(hamming(candidate, other) > max_distance + JPEG_MARGIN for other in hashes):
                    hashes.append(candidate)
                    break


def write_stage1_export(config: InfuConfig) -> dict[str, Any]:
    """An untrained stage-1 export (the fresh InfU of the tiny base, ``model.tiny_seed``), written where and
    how the stage1 step writes its own: ``stage1/export`` in the released layout through ``run_reduce``,
    and a complete manifest naming it, which is all the synth step reads of stage 1."""
    import torch

    from infu.model.factory import load_infu
    from infu.model.tiny import tiny_flux_components
    from training.checkpoint import EXPORT_DIR

    model = config.model
    output = open_step_output(config, "stage1", config.step("stage1"))
    transformer = tiny_flux_components(model.projection.output_dim, model.tiny_seed)["transformer"]
    infu = load_infu(model, transformer, torch.float32)

    def build(folder: Path) -> dict[str, str]:
        infu.save_pretrained(folder, version=model.infu_version)
        return {"version": model.infu_version}

    run_reduce(output.out_dir / EXPORT_DIR, "untrained", build)
    return output.complete(
        export=str(output.out_dir / EXPORT_DIR), steps=0, counts={"steps": 0, "samples_seen": 0}
    )


def prepare(config: InfuConfig, work: Path, copies: int) -> int:
    """The synth step's inputs in ``work``: the corpus copies ingested and filtered, and a stage-1 export;
    returns the number of references (kept portraits)."""
    from corpus import corpus_copies

    from filtering.filter import run_filter
    from filtering.ingest import run_ingest

    images = corpus_copies(work, copies)
    distinct_copies(images, copies, config.step("filter").thresholds.max_phash_distance)
    run_ingest(config)
    references = run_filter(config)["counts"]["ok"]
    write_stage1_export(config)
    return references


def loop_worker(config: InfuConfig, shards: list[str], samples: Any) -> None:
    """One bare process: build the synth phase's stages (ReferenceStage, GenerateStage, SwapStage, with the
    phase's own arguments) once, then run every chunk of its shards through them, as a Ray worker does."""
    export = Path(read_manifest(config.step_dir("stage1"))["export"])
    scratch = Path(tempfile.mkdtemp(prefix="synth-loop-"))  # the phase's output folder: never written
    phase = synth_phase(config, config.step_dir("filter"), export, scratch, {})
    stages = [ref.build() for ref in phase.stages]
    for built in stages:
        built.setup()
    for task in phase.tasks:
        if task.name not in shards:
            continue
        for chunk in batched(phase.read_task(task.ref), phase.resources.batch_size):
            items: list[Any] = chunk
            for built in stages:
                items = built.process(items)
            with samples.get_lock():
                samples.value += len(items)
    for built in stages:
        built.teardown()
    shutil.rmtree(scratch)


def bare_loop(config: InfuConfig, processes: int) -> tuple[float, int]:
    """Seconds and samples of ``processes`` spawned processes over the filter's shards (round-robin)."""
    from infu.shards import committed_shards

    shards = committed_shards(config.step_dir("filter"))
    context = multiprocessing.get_context("spawn")
    samples = context.Value("i", 0)
    started = time.perf_counter()
    workers = [
        context.Process(target=loop_worker, args=(config, shards[index::processes], samples))
        for index in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0, worker.exitcode
    return time.perf_counter() - started, samples.value


def ray_job(config: InfuConfig) -> tuple[float, int]:
    """Seconds and samples written (pair rows) of the synth step, from a fresh output folder."""
    shutil.rmtree(config.step_dir("synth"), ignore_errors=True)
    started = time.perf_counter()
    manifest = run_synth(config)
    seconds = time.perf_counter() - started
    assert manifest["status"] == "complete", manifest["failed_shards"]
    return seconds, manifest["counts"]["samples"]


def measured_keep_rate(overrides: list[str]) -> tuple[int, int]:
    """Kept pairs and samples of the synth step with the embedded profile's ``photo_share`` (0.5: half the
    targets are pose photos, so faces reach the swap and the filter) and the SPMS filter after it."""
    from datagen.spms_filter import run_spms

    embedded = ROOT / "configs" / "embedded.yaml"
    photo_share = load_config(embedded).step("synth").photo_share
    config = load_config(embedded, [*overrides, f"synth.photo_share={photo_share}"])
    synth = run_synth(config)
    spms = run_spms(config)
    return spms["counts"]["ok"], synth["counts"]["samples"]


def generation_flops() -> float:
    """Forward FLOPs of one FLUX.1-dev + InfuseNet (factor 4) generation at 1024 x 1024, 30 steps, one
    transformer pass per step (FLUX.1-dev is guidance-distilled: no classifier-free doubling), from the
    training planner's forward terms; text encoders and VAE are left out (well under 1%)."""
    from infu.model.config import ProjectionConfig
    from training.plan import PlanConfig, plan_training

    plan = plan_training(
        PlanConfig(resolution=PAPER_SIDE),
        factor=4,
        projection=ProjectionConfig(),
        global_batch=128,
        micro_batch=1,
        steps=1,
        activation_checkpointing=True,
    )
    per_step = plan.base_forward_flops + (plan.infusenet_flops + plan.attention_flops) / 3
    return PAPER_STEPS * per_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=4, help="copies of the corpus (about 10 kept each)")
    parser.add_argument("--samples-per-reference", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="synth workers = bare loop processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop/job rounds (medians)")
    parser.add_argument(
        "--keep-rate",
        type=float,
        default=0.5,
        help="share of generated samples the SPMS filter keeps at scale: an ASSUMPTION (no measured or "
        "published rate is at hand; the tiny model's says nothing)",
    )
    parser.add_argument(
        "--gpu-seconds-per-image",
        type=float,
        default=None,
        help="GPU seconds of one FLUX.1-dev + InfuseNet generation, 1024 x 1024, 30 steps; default: the "
        "planner's FLOPs at --mfu of --peak-tflops",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed FLOPs utilisation of generation")
    parser.add_argument(
        "--overhead-seconds-per-image",
        type=float,
        default=0.3,
        help="GPU seconds of the swap (face analysis, INSwapper) and the SPMS filter per sample: assumed",
    )
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument(
        "--measure-keep-rate",
        action="store_true",
        help="also run synth with photo_share 0.5 and the SPMS filter, and print the tiny model's keep rate",
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker, bare processes and Ray workers alike
    start_local_ray(
        num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        overrides = [
            f"run.run_dir={work / 'run'}",
            "ingest.source.kind=folder",
            f"ingest.source.path={work / 'images'}",
            "ingest.shard_size=16",
            f"synth.samples_per_reference={args.samples_per_reference}",
            f"synth.pose_photos={work / 'base' / 'people'}",
            "synth.pose_share=0.5",
            "synth.photo_share=0",
            f"synth.resources.concurrency={args.concurrency}",
        ]
        config = load_config(ROOT / "configs" / "embedded.yaml", overrides)
        references = prepare(config, work, args.copies)

        loop_times, job_times = [], []
        for _ in range(args.rounds):
            seconds, count = bare_loop(config, args.concurrency)
            loop_times.append(seconds)
            seconds, job_count = ray_job(config)
            job_times.append(seconds)
            assert job_count == count == references * args.samples_per_reference, (job_count, count)
        kept = measured_keep_rate(overrides) if args.measure_keep_rate else None
    ray.shutdown()

    loop, job = statistics.median(loop_times), statistics.median(job_times)
    inference = config.model.inference
    print(
        f"synth, tiny InfU {inference.width}x{inference.height} {inference.num_steps} steps, {references}"
        f" references x {args.samples_per_reference} = {count} samples, all generated (photo_share 0,"
        f" pose_share 0.5), {args.concurrency} worker(s), median of {args.rounds} round(s):"
        f" bare loop {count / loop:6.2f} samples/s | Ray job {count / job:6.2f} samples/s"
        f" | job/loop {loop / job:5.2f} (goal >= 0.9); the job takes {job - loop:+.1f} s"
    )
    print(
        "  the tiny model paints noise: no target holds a face, so every row is a no_face reject and the"
        " swap stage's cost here is face detection only (no swap, no PNG encode)"
    )
    print(
        f"  seconds per round: loop {' '.join(f'{s:.1f}' for s in loop_times)}"
        f" | job {' '.join(f'{s:.1f}' for s in job_times)}"
    )
    if kept is not None:
        print(
            f"tiny-model keep rate (photo_share 0.5, SPMS filter): {kept[0]} of {kept[1]} samples kept ="
            f" {kept[0] / kept[1]:.2f}; only pose-photo targets can pass, so this checks the path and says"
            " nothing about FLUX.1-dev's rate (not used below)"
        )

    flops = generation_flops()
    if args.gpu_seconds_per_image is None:
        generation = flops / (args.peak_tflops * 1e12 * args.mfu)
        source = (
            f"ASSUMED: the planner's {flops / 1e15:.2f} PFLOP per image (FLUX.1-dev + InfuseNet forward,"
            f" {PAPER_STEPS} steps) at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s"
        )
    else:
        generation = args.gpu_seconds_per_image
        implied = flops / generation / (args.peak_tflops * 1e12)
        source = f"given; {implied:.0%} MFU of {args.peak_tflops:g} TFLOP/s for {flops / 1e15:.2f} PFLOP"
    to_generate = PAPER_PAIRS / args.keep_rate
    per_sample = generation + args.overhead_seconds_per_image
    hours = to_generate * per_sample / 3600
    print(
        f"2M kept SPMS pairs at keep rate {args.keep_rate:.2f} (ASSUMED, --keep-rate: not a measured"
        " or published rate):"
        f" {to_generate / 1e6:.1f}M samples to generate"
    )
    print(
        f"  per sample: {generation:.1f} GPU-s generation at {PAPER_SIDE}x{PAPER_SIDE}, {PAPER_STEPS} steps"
        f" ({source}) + {args.overhead_seconds_per_image:.2f} GPU-s swap and SPMS filter (ASSUMED)"
    )
    print(
        f"  {hours:,.0f} GPU-hours; {hours / 24 / args.gpus:.1f} days on {args.gpus} GPUs (GPU time only,"
        " perfect scaling)"
    )


if __name__ == "__main__":
    main()
