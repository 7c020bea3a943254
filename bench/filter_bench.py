"""Filter throughput: the Ray job vs a bare single-process loop with the same models; shard I/O vs tar.

Run: .venv/bin/python bench/filter_bench.py [--copies 4]
Prints images/s of the scoring phase both ways and their ratio (goal: the job is not slower than the
loop on the same cores), and MB/s of shard write+read against a plain tar write+read of the same bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import ray

from filtering.filter import ScoreStage, shard_tasks
from filtering.ingest import run_ingest
from infu.config import load_config
from infu.records import new_record
from infu.runner import run_shards
from infu.sample_corpus import build_sample_corpus
from infu.shards import ShardWriter, iter_samples, read_records

ROOT = Path(__file__).resolve().parents[1]


def corpus_copies(folder: Path, copies: int) -> Path:
    """The sample corpus's images that pass ingest, ``copies`` times under distinct names."""
    labels = build_sample_corpus(folder / "base")
    images = folder / "images"
    images.mkdir()
    for label in labels:
        if label.expect_ingest == "ok":
            for copy in range(copies):
                shutil.copy(folder / "base" / label.path, images / f"{copy}_{Path(label.path).name}")
    return images


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
    settings = config.filter
    tasks = list(shard_tasks(config.step_dir("ingest"), config.step_dir("ingest")))
    count = sum(len(task.items) for task in tasks)

    stage = ScoreStage(settings, config.face, config.quality)
    stage.setup()
    started = time.perf_counter()
    for task in tasks:
        stage.process_batch(task.items)
    loop = count / (time.perf_counter() - started)

    started = time.perf_counter()
    run_shards(
        work / "scored",
        tasks,
        partial(ScoreStage, settings, config.face, config.quality),
        settings.resources,
        label="bench",
        with_images=False,
    )
    job = count / (time.perf_counter() - started)
    assert len(read_records(work / "scored")) == count
    print(
        f"filter score phase, {count} images, {settings.resources.concurrency} workers x "
        f"{settings.resources.num_cpus} CPU: loop {loop:6.2f} img/s | Ray job {job:6.2f} img/s | "
        f"job/loop {job / loop:5.2f}"
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
    parser.add_argument("--copies", type=int, default=4, help="copies of the corpus images to score")
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "shards").mkdir()
        (Path(folder) / "warmup").mkdir()
        bench_shards(Path(folder))
        bench_filter(Path(folder), args.copies)
    ray.shutdown()


if __name__ == "__main__":
    main()
