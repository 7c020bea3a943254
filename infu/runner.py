"""Shard-parallel step runner on Ray Data.

A step is a :class:`Stage` (``setup()`` once per worker, ``process_batch()`` per batch of samples,
in the spirit of NeMo Curator stages) plus an iterable of :class:`ShardTask` (what goes into each
output shard). The runner skips shards already committed, hands the rest to a pool of Ray actors
(each commits whole shards atomically through :class:`~infu.shards.ShardWriter`) and reports
progress with live kept/rejected counts. Resuming a killed run redoes only the missing shards.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infu.config import Resources
from infu.raycluster import ensure_ray
from infu.shards import TMP_DIR, ShardWriter, clean_uncommitted, committed_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One output shard: its name and the small descriptors of its input samples."""

    name: str
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class StageOutput:
    """A processed sample: its record, and for kept samples the original bytes and extension."""

    record: dict[str, Any]
    image: bytes | None = None
    extension: str | None = None


class Stage(ABC):
    """Per-worker work of a step. Heavy state (models) is created in :meth:`setup`, once per worker."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models or open sources; called once in each worker before any batch."""

    @abstractmethod
    def process_batch(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        """Turn input descriptors into one output per item (bad input -> a rejected record)."""


def batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class ShardWorker:
    """A Ray actor: builds its stage once, then writes and commits whole shards."""

    def __init__(
        self,
        make_stage: Callable[[], Stage],
        out_dir: str,
        batch_size: int,
        extra_stats: dict,
        with_images: bool,
    ):
        self.stage = make_stage()
        self.stage.setup()
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.extra_stats = extra_stats
        self.with_images = with_images

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        task = ShardTask(name=row["name"], items=json.loads(row["items_json"]))
        with ShardWriter(self.out_dir, task.name, self.extra_stats, self.with_images) as writer:
            for items in batched(task.items, self.batch_size):
                outputs = self.stage.process_batch(items)
                if len(outputs) != len(items):
                    raise RuntimeError(
                        f"{type(self.stage).__name__} returned {len(outputs)} outputs for {len(items)}"
                    )
                for output in outputs:
                    writer.add(output.record, output.image, output.extension)
            stats = writer.commit()
        return {"name": task.name, "stats_json": json.dumps(stats)}


class _Progress:
    """A rich progress bar on a terminal, one log line per shard elsewhere (Ray job logs)."""

    def __init__(self, label: str, total: int | None):
        self.label = label
        self.kept = self.rejected = self.shards = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TextColumn("kept {task.fields[kept]} rejected {task.fields[rejected]}"),
            TimeElapsedColumn(),
        )
        self.live = self.progress.console.is_terminal
        self.task = self.progress.add_task(label, total=total, kept=0, rejected=0)

    def __enter__(self) -> _Progress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        self.kept += stats["ok"]
        self.rejected += stats["rejected"]
        self.progress.update(self.task, advance=1, kept=self.kept, rejected=self.rejected)
        if not self.live:
            print(
                f"{self.label}: shard {stats['shard']} committed "
                f"({stats['ok']} kept, {stats['rejected']} rejected);"
                f" total {self.shards} shards, {self.kept} kept, {self.rejected} rejected",
                flush=True,
            )


def run_shards(
    out_dir: Path,
    tasks: Iterable[ShardTask],
    make_stage: Callable[[], Stage],
    resources: Resources,
    *,
    label: str,
    total_shards: int | None = None,
    extra_stats: dict[str, Any] | None = None,
    with_images: bool = True,
    window: int = 256,
) -> dict[str, Any]:
    """Produce every missing shard of ``tasks`` in ``out_dir``; returns run timings and counts.

    Tasks are consumed lazily, ``window`` shards at a time, so the driver never holds a whole
    dataset's listing.
    """
    import ray.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_uncommitted(out_dir)
    if removed:
        log.warning("removed %d leftovers of an interrupted run in %s", len(removed), out_dir)
    done = set(committed_shards(out_dir))
    ensure_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    started = time.time()
    skipped = written = 0
    with _Progress(label, total_shards) as progress:
        for chunk in batched(tasks, window):
            pending = [task for task in chunk if task.name not in done]
            skipped += len(chunk) - len(pending)
            progress.progress.update(progress.task, advance=len(chunk) - len(pending))
            if not pending:
                continue
            rows = [{"name": task.name, "items_json": json.dumps(task.items)} for task in pending]
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
                ShardWorker,
                fn_constructor_kwargs={
                    "make_stage": make_stage,
                    "out_dir": str(out_dir),
                    "batch_size": resources.batch_size,
                    "extra_stats": extra_stats or {},
                    "with_images": with_images,
                },
                compute=ray.data.ActorPoolStrategy(size=min(resources.concurrency, len(rows))),
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
            )
            for row in dataset.iter_rows():
                progress.update(json.loads(row["stats_json"]))
                written += 1
    if (out_dir / TMP_DIR).exists() and not any((out_dir / TMP_DIR).iterdir()):
        (out_dir / TMP_DIR).rmdir()
    return {
        "started": started,
        "seconds": round(time.time() - started, 3),
        "shards_written": written,
        "shards_skipped": skipped,
        "leftovers_removed": removed,
    }
