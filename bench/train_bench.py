"""Training throughput: optimiser steps fed by the real loader vs by one batch held in memory, and FLOPs
per sample for MFU.

Run: .venv/bin/python bench/train_bench.py [--steps 60] [--micro-batch 2] [--peak-tflops 989]
On the embedded profile's tiny models (one process, no FSDP): the sample corpus is ingested, filtered and
captioned, then the same optimiser step (:func:`training.train.optimizer_step`) runs on batches from
:func:`training.data.worker_batches` (decode, crop, control drawing, caption mixture, read ahead in a
thread), on batches whose latents and caption embeddings come from the precompute step's cache, and on
one batch repeated, in alternating rounds. Prints the median step time real/in-memory (goal <= 1.10),
cached/in-memory (1 minus the frozen encoders' share of a step), samples/s, the FLOPs of a step per
sample measured by torch's FLOP counter, and MFU when ``--peak-tflops`` of the device is given; then
the planner's FLOPs per sample for the paper's setup.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioning.caption import run_caption
from filtering.filter import run_filter
from filtering.ingest import run_ingest
from infu.config import load_config
from infu.lineage import upstream_inputs
from infu.model.config import ProjectionConfig
from infu.raycluster import start_local_ray
from training.data import step_samples, worker_batches
from training.plan import PAPER_STAGE1, PlanConfig, plan_training
from training.precompute import run_precompute, step_cache
from training.train import build_trainer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5


def step_seconds(step: Any, batches: Iterator[dict[str, Any]], count: int) -> list[float]:
    """Seconds of each of ``count`` optimiser steps."""
    seconds = []
    for index in range(count):
        started = time.perf_counter()
        step(batches, index)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side, in 5 rounds")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        config = load_config(
            ROOT / "configs" / "embedded.yaml",
            [
                f"run.run_dir={run_dir}",
                f"ingest.source.path={run_dir / 'corpus'}",
                f"stage1.data.micro_batch={args.micro_batch}",
                f"stage1.global_batch={args.micro_batch}",
                "stage1.resources.workers=1",
            ],
        )
        start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False)
        run_ingest(config)
        run_filter(config)
        run_caption(config)
        run_precompute(config)
        ray.shutdown()

        settings = config.step("stage1")
        device = torch.device("cpu")
        trainer = build_trainer(config, settings, device)  # no process group: no FSDP
        inputs = upstream_inputs(config, "stage1")
        samples, cached = (
            step_samples(inputs, settings, config.model.projection.embedding_space) for _ in range(2)
        )
        cached.use_cache(step_cache(config, inputs, trainer.objective.encoders))

        def step(batches: Iterator[dict[str, Any]], index: int) -> None:
            optimizer_step(trainer, batches, settings, index, 0, 1)

        batch = next(worker_batches(samples, 0, 1, 0))
        loader, cached_loader = worker_batches(samples, 0, 1, 0), worker_batches(cached, 0, 1, 0)
        step_seconds(step, loader, 3)  # warm-up: allocator, read-ahead threads
        step_seconds(step, cached_loader, 3)
        # alternating rounds, medians: a busy VM's pauses hit both sides alike and drop out
        real_times: list[float] = []
        memory_times: list[float] = []
        cached_times: list[float] = []
        for _ in range(ROUNDS):
            real_times += step_seconds(step, loader, args.steps // ROUNDS)
            memory_times += step_seconds(step, itertools.repeat(batch), args.steps // ROUNDS)
            cached_times += step_seconds(step, cached_loader, args.steps // ROUNDS)
        real, in_memory = statistics.median(real_times), statistics.median(memory_times)
        from_cache = statistics.median(cached_times)
        with FlopCounterMode(display=False) as counter:
            step(itertools.repeat(batch), 0)
        flops = counter.get_total_flops() / args.micro_batch
        height, width = batch["pixels"].shape[-2:]

    print(
        f"stage-1 step, tiny models, {args.micro_batch} samples of {width}x{height} per step, 1 CPU process:"
        f" real loader {real * 1000:7.1f} ms/step | in-memory batch {in_memory * 1000:7.1f} ms/step"
        f" | real/in-memory {real / in_memory:5.2f} (goal <= 1.10)"
    )
    print(
        f"precompute cache: {from_cache * 1000:7.1f} ms/step | cached/in-memory {from_cache / in_memory:5.2f}"
        " (the frozen encoders' share of a step is saved)"
    )
    per_step = args.micro_batch
    print(
        f"samples/s: real loader {per_step / real:6.2f} | in-memory {per_step / in_memory:6.2f};"
        f" {flops / 1e9:.3f} GFLOP per sample per step (torch FLOP counter: encoders, forward, backward)"
    )
    if args.peak_tflops:
        mfu = flops * args.micro_batch / real / (args.peak_tflops * 1e12)
        print(f"MFU at {args.peak_tflops} TFLOP/s peak: {mfu:.4%}")
    paper = plan_training(PlanConfig(), projection=ProjectionConfig(), **PAPER_STAGE1)
    print(
        f"paper setup (planner): {paper.flops_per_sample / 1e12:.1f} TFLOP per sample; "
        f"{paper.days:.1f} days for {paper.steps} steps at {paper.plan.mfu:.0%} MFU on {paper.plan.gpus} GPUs"
    )


if __name__ == "__main__":
    main()
