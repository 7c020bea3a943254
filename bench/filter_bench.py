"""Filter throughput: the Ray job at 1 and 2 workers, and against bare processes; shard I/O vs tar.

Run: .venv/bin/python bench/filter_bench.py [--copies 16]
Prints images/s of the filter's score phase (decode + score stages, one thread per worker):
(a) Ray job with 2 score workers vs 1 (scaling efficiency = ratio / 2; goal >= 0.85 on 2 cores);
(b) Ray job vs a bare loop over the same shards in the same number of processes (goal >= 0.95).
Each rate is given over the whole run (start-up and model loading in every worker included) and in the
steady state: the images finished between 10% and 90% of them being done, over that time (what a run of
hours sees). Then MB/s of shard write+read against a plain tar.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from corpus import corpus_copies

from filtering.filter import ScoreStage, read_input_shard, with_identity_threshold
from filtering.ingest import run_ingest
from infu.config import InfuConfig, load_config
from infu.raycluster import start_local_ray
from infu.records import new_record
from infu.runner import DecodeStage, Phase, batched, run_phase, shard_tasks, stage
from infu.shards import ShardWriter, committed_shards, iter_samples, read_records, read_stats

ROOT = Path(__file__).resolve().parents[1]


def loop_worker(config: InfuConfig, shards: list[str], finished: multiprocessing.Queue) -> None:
    """One bare process: build the stages once, run every chunk of its shards through them; puts
    ``(time, images)`` on ``finished`` as each shard is done."""
    import torch

    torch.set_num_threads(1)
    settings = with_identity_threshold(config.step("filter"), config.face)
    decode = DecodeStage(settings.max_pixels)
    score = ScoreStage(settings, config.face, config.quality)
    score.setup()
    ingest_dir = config.step_dir("ingest")
    for task in shard_tasks(shards, records=ingest_dir, tar=ingest_dir):
        items = read_input_shard(task.ref)
        for chunk in batched(items, settings.resources.batch_size):
            score.process(decode.process(chunk))
        finished.put((time.time(), len(items)))


def steady_rate(finished: list[tuple[float, int]]) -> float:
    """Images/s between the times 10% and 90% of the images were done (``finished``: per shard, the time
    it was done and its images)."""
    times, images = np.array(sorted(finished)).T
    done = np.cumsum(images)
    first, last = np.searchsorted(done, [0.1 * done[-1], 0.9 * done[-1]])
    return float((done[last] - done[first]) / (times[last] - times[first]))


def bare_loop(config: InfuConfig, processes: int) -> tuple[float, float]:
    """Seconds for ``processes`` spawned processes to score every shard (round-robin split), and their
    steady rate."""
    shards = committed_shards(config.step_dir("ingest"))
    context = multiprocessing.get_context("spawn")
    finished = context.Queue()
    started = time.perf_counter()
    workers = [
        context.Process(target=loop_worker, args=(config, shards[index::processes], finished))
        for index in range(processes)
    ]
    for worker in workers:
        worker.start()
    done = [finished.get(timeout=900) for _ in shards]
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    return time.perf_counter() - started, steady_rate(done)


def ray_job(config: InfuConfig, workers: int, out: Path) -> tuple[float, float]:
    """Seconds for the filter's score phase with ``workers`` score workers, and its steady rate (from
    the commit times of the shards)."""
    settings = with_identity_threshold(config.step("filter"), config.face)
    resources = settings.resources.model_copy(update={"concurrency": workers})
    ingest_dir = config.step_dir("ingest")
    started = time.perf_counter()
    result = run_phase(
        Phase(
            label=f"bench {workers} workers",
            out_dir=out,
            tasks=shard_tasks(committed_shards(ingest_dir), records=ingest_dir, tar=ingest_dir),
            read_task=read_input_shard,
            stages=[
                stage(DecodeStage, max_pixels=settings.max_pixels),
                stage(ScoreStage, config=settings, face=config.face, quality=config.quality),
            ],
            resources=resources,
            with_images=False,
        )
    )
    seconds = time.perf_counter() - started
    assert not result.failed and len(read_records(out)) == len(read_records(ingest_dir))
    finished = [(stats["started"] + stats["seconds"], stats["count"]) for stats in read_stats(out)]
    return seconds, steady_rate(finished)


def bench_filter(work: Path, copies: int) -> None:
    images = corpus_copies(work, copies)
    config = load_config(
        ROOT / "configs" / "embedded.yaml",
        [
            f"run.run_dir={work / 'run'}",
            "ingest.source.kind=folder",
            f"ingest.source.path={images}",
            "ingest.shard_size=8",
        ],
    )
    run_ingest(config)
    count = len(read_records(config.step_dir("ingest")))
    whole, steady = {}, {}
    for workers in (1, 2):
        for kind, seconds_and_rate in (
            ("loop", bare_loop(config, workers)),
            ("ray", ray_job(config, workers, work / f"scored-{workers}")),
        ):
            whole[kind, workers], steady[kind, workers] = count / seconds_and_rate[0], seconds_and_rate[1]
    for label, rate in (("whole run", whole), ("steady state", steady)):
        for workers in (1, 2):
            loop, job = rate["loop", workers], rate["ray", workers]
            print(
                f"filter score phase, {count} images, {workers} worker(s), {label}: bare loop {loop:6.2f} "
                f"img/s | Ray job {job:6.2f} img/s | job/loop {job / loop:5.2f}"
            )
        print(
            f"{label}: (a) Ray job scaling 2 vs 1 workers: {rate['ray', 2] / rate['ray', 1]:5.2f}x, "
            f"efficiency {rate['ray', 2] / rate['ray', 1] / 2:5.2f} (goal >= 0.85; bare loop "
            f"{rate['loop', 2] / rate['loop', 1] / 2:5.2f}) | (b) Ray job / bare loop at 2 workers: "
            f"{rate['ray', 2] / rate['loop', 2]:5.2f} (goal >= 0.95)"
        )


def bench_shards(work: Path, samples: int = 400, size: int = 256 * 1024) -> None:
    payloads = [os.urandom(size) for _ in range(samples)]
    megabytes = samples * size / 1e6

    started = time.perf_counter()
    with tarfile.open(work / "plain.tar", "w") as tar:
        for index, payload in enumerate(payloads):
            info = tarfile.TarInfo(f"{index:06d}.jpg")
            info.size = len(payload)
            tar.addfile(info, fileobj=io.BytesIO(payload))
    with tarfile.open(work / "plain.tar") as tar:
        total = sum(len(tar.extractfile(member).read()) for member in tar)
    plain = megabytes / (time.perf_counter() - started)
    assert total == samples * size

    with ShardWriter(work / "warmup", "000000") as writer:  # first use imports pyarrow's pandas bridge
        writer.add(new_record("bench", "warmup.jpg", mime="image/jpeg"), payloads[0], "jpg")
        writer.commit()
    started = time.perf_counter()
    with ShardWriter(work / "shards", "000000") as writer:
        for index, payload in enumerate(payloads):
            writer.add(new_record("bench", f"{index}.jpg", mime="image/jpeg"), payload, "jpg")
        writer.commit()
    read = sum(len(sample.image) for sample in iter_samples(work / "shards"))
    shards = megabytes / (time.perf_counter() - started)
    assert read == samples * size
    print(
        f"shard write+read, {megabytes:.0f} MB: plain tar {plain:7.1f} MB/s | shard (tar+parquet+stats, "
        f"atomic) {shards:7.1f} MB/s | shard/tar {shards / plain:5.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=16, help="copies of the corpus images to score")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker, bare processes and Ray workers alike
    start_local_ray(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "shards").mkdir()
        (Path(folder) / "warmup").mkdir()
        bench_shards(Path(folder))
        bench_filter(Path(folder), args.copies)
    ray.shutdown()


if __name__ == "__main__":
    main()
