"""Captioning throughput: the caption step's Ray job vs a bare batched ``generate`` loop, and the cost of
captioning the paper's 43M images.

Run: .venv/bin/python bench/caption_bench.py [--copies 64] [--source blip2] [--gpu-seconds blip2=0.05 ...]
Both sides caption the same shards with the same tiny model, decode included, in one fresh process or
Ray worker (imports and model loading included): captions/s of the Ray job / captions/s of the loop,
goal >= 0.9, and the job's extra seconds. Then the projection for 43M images: from the per-image cost
measured here (tiny models, CPU) and, per engine, from a production GPU figure passed with --gpu-seconds
once measured on a GPU node.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from corpus import corpus_copies

from captioning.caption import caption_phase
from filtering.ingest import run_ingest
from infu.config import InfuConfig, load_config
from infu.raycluster import start_local_ray
from infu.runner import batched, run_phase, shard_tasks
from infu.shards import committed_shards, read_stats

ROOT = Path(__file__).resolve().parents[1]
PAPER_IMAGES = 43_000_000


def loop_worker(config: InfuConfig, source: str, shards_dir: Path, captions: Any) -> None:
    """The bare loop, in a fresh process: load the captioner, then decode and caption every chunk."""
    from captioning.caption import DecodeStage, read_kept_samples
    from captioning.engines import load_captioner

    settings = config.step("caption")
    captioner = load_captioner(source, settings.neural()[source])
    decode = DecodeStage(settings.max_side, settings.max_pixels)
    for task in shard_tasks(committed_shards(shards_dir), records=shards_dir, tar=shards_dir):
        for chunk in batched(read_kept_samples(task.ref), settings.resources.batch_size):
            images = [item["image"] for item in decode.process(chunk) if item["image"] is not None]
            captions.value += len(captioner.caption(images))


def bare_loop(config: InfuConfig, source: str, shards_dir: Path) -> tuple[float, int]:
    """Seconds and captions of one spawned process (imports and model loading included, as a Ray
    worker's are)."""
    context = multiprocessing.get_context("spawn")
    captions = context.Value("i", 0)
    started = time.perf_counter()
    worker = context.Process(target=loop_worker, args=(config, source, shards_dir, captions))
    worker.start()
    worker.join()
    assert worker.exitcode == 0
    return time.perf_counter() - started, captions.value


def ray_job(config: InfuConfig, shards_dir: Path, out: Path) -> tuple[float, int]:
    """Seconds and caption rows of the caption step's phase with one worker."""
    started = time.perf_counter()
    result = run_phase(caption_phase(config.step("caption"), shards_dir, out))
    seconds = time.perf_counter() - started
    assert not result.failed, result.failed
    return seconds, sum(stats["count"] for stats in read_stats(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=64, help="copies of the corpus images to caption")
    parser.add_argument("--source", default="blip2", choices=["small", "blip2", "internvl2"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--gpu-seconds",
        nargs="*",
        default=[],
        metavar="SOURCE=SECONDS",
        help="measured production GPU seconds per image of a source's engine, for the 43M projection",
    )
    args = parser.parse_args()
    gpu_seconds = {
        source: float(value) for source, _, value in (item.partition("=") for item in args.gpu_seconds)
    }
    os.environ["OMP_NUM_THREADS"] = "1"
    start_local_ray(
        num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        images = corpus_copies(work, args.copies)
        # One neural source, no model-free ones: both sides do the same model work.
        config = load_config(
            ROOT / "configs" / "embedded.yaml",
            [
                f"run.run_dir={work / 'run'}",
                "ingest.source.kind=folder",
                f"ingest.source.path={images}",
                "ingest.shard_size=16",
                "caption.original=false",
                "caption.attribute=null",
                *(
                    f"caption.{other}=null"
                    for other in ("small", "blip2", "internvl2")
                    if other != args.source
                ),
                f"caption.{args.source}.max_new_tokens={args.max_new_tokens}",
                f"caption.{args.source}.batch_size=8",
                "caption.resources.concurrency=1",
                "caption.resources.batch_size=8",
            ],
        )
        run_ingest(config)
        shards_dir = config.step_dir("ingest")
        loop_seconds, count = bare_loop(config, args.source, shards_dir)
        job_seconds, job_count = ray_job(config, shards_dir, work / "captions")
    ray.shutdown()
    assert job_count == count, (job_count, count)
    print(
        f"caption {args.source} (tiny, {args.max_new_tokens} new tokens), {count} images, 1 worker:"
        f" bare loop {count / loop_seconds:6.2f} captions/s | Ray job {count / job_seconds:6.2f} captions/s"
        f" | job/loop {loop_seconds / job_seconds:5.2f} (goal >= 0.9); the job takes"
        f" {job_seconds - loop_seconds:+.1f} s"
    )
    per_image = loop_seconds / count
    print(
        f"43M images at the measured {per_image * 1000:.1f} ms/image (tiny {args.source}, 1 CPU):"
        f" {PAPER_IMAGES * per_image / 3600:,.0f} CPU-hours"
    )
    for source in ("small", "blip2", "internvl2"):
        if source in gpu_seconds:
            hours = PAPER_IMAGES * gpu_seconds[source] / 3600
            print(f"43M images x {source}: {gpu_seconds[source]} GPU-s/image -> {hours:,.0f} GPU-hours")
        else:
            print(f"43M images x {source}: GPU cost not measured yet (pass --gpu-seconds {source}=S)")


if __name__ == "__main__":
    main()
