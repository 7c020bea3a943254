"""Streaming shard-parallel phases on Ray Data, and reduce phases with the same commit rules.

A **map phase** turns a list of :class:`ShardTask` (a task is a small reference to its input, as in
img2dataset and NeMo Curator) into output shards with one Ray Data pipeline:

1. the driver hands Ray the pending task references (committed shards are skipped);
2. ``read_task`` (Ray tasks) turns each reference into its items, cut into chunks of
   ``resources.batch_size``;
3. each :class:`Stage` is its own operator: an actor pool with its own declared resources, so a GPU
   model stage never waits on a CPU decoding stage (consecutive stages with equal resources, e.g. decode
   and score on a CPU-only node, are fused into one operator). ``setup()`` runs once per worker for the
   whole phase, ``process()`` may emit zero, one or many outputs per item (``one_to_one`` opts into a check),
   ``teardown()`` runs when the pool shuts down;
4. the last stage writes each chunk's outputs as a part file; when every chunk of a shard has arrived,
   a committer actor (one per 8 workers of a stage) merges the parts into the shard and commits it
   atomically (:class:`~infu.shards.ShardWriter`).

A chunk whose stage keeps failing (``resources.retries`` retries) marks its shard failed with the error:
the other shards finish, and :func:`run_phase` reports the failed ones for the manifest. A killed run,
rerun, redoes exactly the shards that were not committed.

A **reduce phase** (:func:`run_reduce`) builds a folder from the committed shards of earlier phases
(global decisions, aggregates) in a temporary folder renamed into place, marked with its identity.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infu.config import Resources
from infu.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from infu.paths import write_atomic
from infu.progress import write_progress
from infu.raycluster import ensure_ray
from infu.records import Status, reject
from infu.shards import (
    RECORDS,
    TMP_DIR,
    InputImages,
    ShardTable,
    ShardWriter,
    clean_uncommitted,
    committed_shards,
    stats_path,
)

log = logging.getLogger(__name__)

REDUCE_MARKER = "_complete.json"
READERS = 2
"""Concurrent ``read_task`` calls of a phase: reading a task's item list is light, and every reader is a
worker process of its own."""


@dataclass(frozen=True)
class ShardTask:
    """One output shard: its name and a small JSON-able reference to its input."""

    name: str
    ref: dict[str, Any]


def shard_tasks(names: list[str], **folders: Path) -> list[ShardTask]:
    """One task per shard name, referring to its files in each named folder: role ``tar`` to
    ``<folder>/<name>.tar``, every other role (``records``, ``decisions``...) to
    ``<folder>/<name>.parquet``."""
    return [
        ShardTask(
            name,
            {
                role: str(folder / f"{name}{'.tar' if role == 'tar' else '.parquet'}")
                for role, folder in folders.items()
            },
        )
        for name in names
    ]


@dataclass(frozen=True)
class StageOutput:
    """A processed sample: its record, and for kept samples the original bytes and extension."""

    record: dict[str, Any]
    image: bytes | None = None
    extension: str | None = None
    members: dict[str, bytes] = field(default_factory=dict)
    """Further files of a kept sample, by suffix: ``{"ref.jpg": ...}`` is written as ``<key>.ref.jpg``."""


class Stage(ABC):
    """One operator of a phase. Heavy state (models) is created in :meth:`setup`, once per worker."""

    name: ClassVar[str] = "stage"
    uses_gpu: ClassVar[bool] = False
    """Model stages reserve the step's ``num_gpus``; other stages never reserve GPUs."""
    one_to_one: ClassVar[bool] = False
    """Check that :meth:`process` returns exactly one output per item."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models or open sources; called once in each worker before any chunk."""

    @abstractmethod
    def process(self, items: list[Any]) -> list[Any]:
        """Outputs for a chunk of items: any number per item (bad input -> a rejected record)."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`setup` acquired; called when the worker's pool shuts down."""


class DecodeStage(Stage):
    """CPU: the original bytes of each still-kept record (items ``{"record", "tar"}``), decoded to an RGB
    array (``rgb``; a bad image rejects its record)."""

    name = "decode"
    one_to_one = True

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = []
        for item in items:
            record, rgb = dict(item["record"]), None
            if record["status"] == Status.OK:
                try:
                    rgb = np.asarray(decode_image(self.images.read(item), self.max_pixels))
                except BadImageError as error:
                    reject(record, error.reason, error.detail)
            decoded.append({"record": record, "rgb": rgb})
        return decoded


@dataclass(frozen=True)
class StageRef:
    """A stage class and its constructor arguments: what each worker builds its stage from; and the Ray
    runtime environment its workers run in (an engine whose pins clash with the job's env has its own)."""

    cls: type[Stage]
    kwargs: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None

    def build(self) -> Stage:
        return self.cls(**self.kwargs)


def stage(cls: type[Stage], runtime_env: dict[str, Any] | None = None, **kwargs: Any) -> StageRef:
    return StageRef(cls, kwargs, runtime_env)


@dataclass(frozen=True)
class Phase:
    """A map phase: tasks -> items -> stages -> committed shards in ``out_dir``."""

    label: str
    out_dir: Path
    tasks: Iterable[ShardTask]
    read_task: Callable[[dict[str, Any]], list[Any]]
    """Runs on a worker: a task's ``ref`` -> its input items (picklable, e.g. a module function)."""
    stages: Sequence[StageRef]
    resources: Resources
    extra_stats: dict[str, Any] = field(default_factory=dict)
    with_images: bool = True
    table: ShardTable = RECORDS
    """What the shards' Parquet files hold: sample records unless the step writes rows of its own."""


@dataclass
class PhaseResult:
    """What a map phase did: shards written, skipped (already committed) and failed (with errors)."""

    seconds: float = 0.0
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    leftovers_removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "shards_written": self.written,
            "shards_skipped": self.skipped,
            "shards_failed": dict(sorted(self.failed.items())),
            "leftovers_removed": self.leftovers_removed,
        }


def batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _parts_dir(out_dir: Path, shard: str) -> Path:
    return out_dir / TMP_DIR / f"{shard}.parts"


def _chunk_row(shard: str, chunk: int, chunks: int, payload: bytes = b"", error: str = "") -> dict[str, Any]:
    return {"shard": shard, "chunk": chunk, "chunks": chunks, "payload": payload, "error": error, "kept": 0}


def _read_chunks(
    row: dict[str, Any], read_task: Callable[[dict[str, Any]], list[Any]], chunk_size: int
) -> list[dict[str, Any]]:
    """A task reference -> its items in chunks (a read error becomes the shard's one error row)."""
    shard = row["shard"]
    try:
        items = read_task(json.loads(row["ref"]))
    except Exception as error:  # noqa: BLE001 - recorded as the shard's failure
        log.exception("reading the input of shard %s failed", shard)
        return [_chunk_row(shard, 0, 1, error=f"read: {type(error).__name__}: {error}")]
    chunks = list(batched(items, chunk_size)) or [[]]
    return [_chunk_row(shard, index, len(chunks), pickle.dumps(chunk)) for index, chunk in enumerate(chunks)]


class _StageWorker:
    """A Ray actor running one operator (one stage, or several fused) over chunks; the last operator of a
    phase writes each chunk as a part."""

    def __init__(self, refs: list[StageRef], retries: int, parts_root: str | None):
        self.stages = [ref.build() for ref in refs]
        for built in self.stages:
            built.setup()
        self.retries = retries
        self.parts_root = Path(parts_root) if parts_root else None

    def _process(self, stage_: Stage, items: list[Any], row: dict[str, Any]) -> tuple[list[Any] | None, str]:
        """``stage_``'s outputs for a chunk, retried; ``(None, error)`` when every attempt failed."""
        error = ""
        for attempt in range(self.retries + 1):
            try:
                outputs = stage_.process(items)
                if stage_.one_to_one and len(outputs) != len(items):
                    raise RuntimeError(f"returned {len(outputs)} outputs for {len(items)} items")
                return outputs, ""
            except Exception as exc:  # noqa: BLE001 - retried, then recorded as the shard's failure
                error = f"{stage_.name}: {type(exc).__name__}: {exc}"
                log.warning(
                    "shard %s chunk %d, attempt %d: %s", row["shard"], row["chunk"], attempt + 1, error
                )
        return None, error

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"]:
            return row
        outputs = pickle.loads(row["payload"])
        for stage_ in self.stages:
            outputs, error = self._process(stage_, outputs, row)
            if outputs is None:
                return {**row, "payload": b"", "error": error}
        if self.parts_root is None:
            return {**row, "payload": pickle.dumps(outputs)}
        part = _parts_dir(self.parts_root, row["shard"]) / f"{row['chunk']:06d}.pkl"
        part.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(part, pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
        return {**row, "payload": b"", "kept": len(outputs)}

    def __del__(self) -> None:
        for built in self.stages:
            built.teardown()


def commit_parts(
    out_dir: Path,
    shard: str,
    chunks: int,
    extra_stats: dict[str, Any],
    with_images: bool,
    table: ShardTable = RECORDS,
) -> dict[str, Any]:
    """Merge a shard's part files, in chunk order, into one atomically committed shard; returns its stats.

    Safe to retry: only pending shards are committed, so stats already in place were written (last) by an
    attempt that died before answering; they stand, and what it left of the parts is removed."""
    parts = _parts_dir(out_dir, shard)
    if stats_path(out_dir, shard).exists():
        shutil.rmtree(parts, ignore_errors=True)
        return json.loads(stats_path(out_dir, shard).read_text())
    with ShardWriter(out_dir, shard, extra_stats, with_images, table) as writer:
        for chunk in range(chunks):
            with open(parts / f"{chunk:06d}.pkl", "rb") as handle:
                outputs: list[StageOutput] = pickle.load(handle)
            for output in outputs:
                writer.add(output.record, output.image, output.extension, output.members)
        stats = writer.commit()
    shutil.rmtree(parts, ignore_errors=True)
    return stats


class _Committer:
    """A Ray actor that commits shards (one long-lived process, not a new worker per shard); restarted and
    its commit retried when its process dies."""

    def commit(self, *args: Any) -> dict[str, Any]:
        return commit_parts(*args)


class _Progress:
    """A rich progress bar on a terminal, one log line per shard elsewhere (Ray job logs)."""

    def __init__(self, label: str, total: int, out_dir: Path):
        self.label = label
        self.total = total
        self.out_dir = out_dir
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

    def advance(self, count: int) -> None:
        self.progress.update(self.task, advance=count)
        self._record()

    def _record(self) -> None:
        """The shards finished so far, for the flow's progress artifact (:mod:`infu.progress`)."""
        done = int(self.progress.tasks[0].completed)
        write_progress(self.out_dir, self.label, done, self.total, "shards")

    def committed(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        self.kept += stats["ok"]
        self.rejected += stats["rejected"]
        self.progress.update(self.task, advance=1, kept=self.kept, rejected=self.rejected)
        self._record()
        if not self.live:
            print(
                f"{self.label}: shard {stats['shard']} committed "
                f"({stats['ok']} kept, {stats['rejected']} rejected);"
                f" total {self.shards} shards, {self.kept} kept, {self.rejected} rejected",
                flush=True,
            )

    def failed(self, shard: str, error: str) -> None:
        self.advance(1)
        print(f"{self.label}: shard {shard} FAILED: {error}", flush=True)


def _stage_resources(ref: StageRef, resources: Resources) -> tuple[int, float, float, dict[str, Any] | None]:
    """Workers, CPUs and GPUs per worker of one stage (``resources.stages.<name>`` overrides the step's;
    only ``uses_gpu`` stages reserve the step's GPUs), and its runtime environment."""
    override = resources.stages.get(ref.cls.name)
    concurrency = override.concurrency if override and override.concurrency else resources.concurrency
    num_cpus = override.num_cpus if override and override.num_cpus else resources.num_cpus
    num_gpus = resources.num_gpus if ref.cls.uses_gpu else 0.0
    if override and override.num_gpus is not None:
        num_gpus = override.num_gpus
    return concurrency, num_cpus, num_gpus, ref.runtime_env


def fused_operators(stages: Sequence[StageRef], resources: Resources) -> list[tuple[list[StageRef], tuple]]:
    """The phase's operators: runs of consecutive stages with equal resources and runtime environment
    become one operator (its actors run them in turn, with nothing serialised between them, as Ray Data
    fuses maps), with the resources of its stages."""
    operators: list[tuple[list[StageRef], tuple]] = []
    for ref in stages:
        wanted = _stage_resources(ref, resources)
        if operators and operators[-1][1] == wanted:
            operators[-1][0].append(ref)
        else:
            operators.append(([ref], wanted))
    return operators


def _pipeline(phase: Phase, pending: list[ShardTask]):  # noqa: ANN202 - ray.data.Dataset
    import ray.data

    rows = [{"shard": task.name, "ref": json.dumps(task.ref)} for task in pending]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).flat_map(
        _read_chunks,
        fn_kwargs={"read_task": phase.read_task, "chunk_size": phase.resources.batch_size},
        compute=ray.data.TaskPoolStrategy(size=min(READERS, len(rows))),
        num_cpus=0.1,
    )
    operators = fused_operators(phase.stages, phase.resources)
    for index, (refs, (concurrency, num_cpus, num_gpus, runtime_env)) in enumerate(operators):
        last = index == len(operators) - 1
        dataset = dataset.map(
            _StageWorker,
            fn_constructor_kwargs={
                "refs": refs,
                "retries": phase.resources.retries,
                "parts_root": str(phase.out_dir) if last else None,
            },
            # No more workers than shards to do: a worker loads its models once, for work it may not get
            # (Ray Data's min/max autoscaling did not grow a pool with chunks waiting, measured).
            compute=ray.data.ActorPoolStrategy(size=min(concurrency, len(pending))),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            **({"runtime_env": runtime_env} if runtime_env else {}),
        )
    return dataset


def run_phase(phase: Phase) -> PhaseResult:
    """Produce every missing shard of ``phase`` in its ``out_dir``; a failing shard does not stop the rest."""
    import ray

    started = time.time()
    out_dir = Path(phase.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PhaseResult(leftovers_removed=clean_uncommitted(out_dir))
    if result.leftovers_removed:
        log.warning(
            "removed %d leftovers of an interrupted run in %s", len(result.leftovers_removed), out_dir
        )
    done = set(committed_shards(out_dir))
    tasks = list(phase.tasks)
    pending = [task for task in tasks if task.name not in done]
    result.skipped = len(tasks) - len(pending)
    with _Progress(phase.label, len(tasks), out_dir) as progress:
        progress.advance(result.skipped)
        if pending:
            ensure_ray()
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts shards instead
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
            committers = [
                ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Committer).remote()
                for _ in range(max(1, phase.resources.concurrency // 8))
            ]
            arrived: Counter[str] = Counter()
            errors: dict[str, str] = {}
            commits: dict[Any, str] = {}

            def collect(timeout: float | None) -> None:
                if not commits:
                    return
                ready, _ = ray.wait(list(commits), num_returns=len(commits), timeout=timeout)
                for ref in ready:
                    shard = commits.pop(ref)
                    try:
                        progress.committed(ray.get(ref))
                        result.written += 1
                    except Exception as error:  # noqa: BLE001 - a shard that cannot be committed fails alone
                        result.failed[shard] = f"commit: {error}"
                        progress.failed(shard, result.failed[shard])

            for row in _pipeline(phase, pending).iter_rows():
                shard = row["shard"]
                arrived[shard] += 1
                if row["error"]:
                    errors.setdefault(shard, f"chunk {row['chunk']}: {row['error']}")
                if arrived[shard] < row["chunks"]:
                    continue
                if shard in errors:
                    result.failed[shard] = errors[shard]
                    shutil.rmtree(_parts_dir(out_dir, shard), ignore_errors=True)
                    progress.failed(shard, errors[shard])
                else:
                    committer = committers[len(commits) % len(committers)]
                    ref = committer.commit.remote(
                        out_dir, shard, row["chunks"], phase.extra_stats, phase.with_images, phase.table
                    )
                    commits[ref] = shard
                collect(timeout=0)
            while commits:
                collect(timeout=None)
    # Every shard is committed or failed now: what is left in _tmp is a killed attempt's (a committer's
    # half-written shard), or parts a rerun redoes anyway.
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)
    result.seconds = time.time() - started
    return result


def run_reduce(dest: Path, identity: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build folder ``dest`` once per identity: ``build(tmp)`` fills a fresh folder, renamed into place.

    ``dest`` holds :data:`REDUCE_MARKER` (identity and what ``build`` returned) iff it is complete; one
    made with another identity, or left incomplete by a killed run, is removed and built again.
    """
    dest = Path(dest)
    marker = dest / REDUCE_MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("identity") == identity:
            return {**done["stats"], "reused": True}
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f"{dest.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = dest.parent / f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    stats = {**build(tmp), "seconds": round(time.time() - started, 3)}
    write_atomic(tmp / REDUCE_MARKER, json.dumps({"identity": identity, "stats": stats}, indent=1).encode())
    tmp.rename(dest)
    return stats
