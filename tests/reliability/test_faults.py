"""Fault injection in a map phase (issue 9): killed Ray workers, and a shard that fails twice then succeeds.

Each phase runs in-process on the module's local Ray (``local_ray``): 6 shards of 4 numbers, chunks of
2, one worker (``concurrency=1``) whose stage sleeps per chunk so the phase lasts a few seconds, and
every result is compared with the rows of an uninterrupted run of the same phase.

- A ``SIGKILL`` of the stage actor's process mid-shard: Ray Data restarts the actor and reruns its
  unfinished task on it (its actor pools default to ``max_restarts=-1, max_task_retries=-1``), so the
  same run commits every shard, with the rows of an uninterrupted run.
- A ``SIGKILL`` of the committer actor: the shards it can no longer commit are failed shards of that run
  (never partial ones), and the rerun commits exactly those.
- A shard whose stage fails in the first two runs (``retries: 0``) is failed in runs 1 and 2 while the
  other shards are committed once and never redone; run 3 commits it.

Processes are only ever looked for among this test process's descendants (its own local Ray), never
among other Ray clusters of the machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from infu.config import Resources
from infu.records import RejectReason, new_record, reject
from infu.runner import Phase, PhaseResult, ShardTask, Stage, StageOutput, run_phase, stage
from infu.shards import TMP_DIR, committed_shards, read_records, stats_path

pytestmark = pytest.mark.slow  # seven map phases on Ray: about 3.5 minutes on 2 busy cores

SHARDS = 6
PER_SHARD = 4
CHUNKS = SHARDS * PER_SHARD // 2
STAGE_WORKER = "ray::MapWorker(Map(_StageWorker))"
"""How Ray Data names the process of a stage actor (``.submit`` is appended while it runs a chunk)."""
COMMITTER = "ray::_Committer"


def read_numbers(ref: dict[str, Any]) -> list[int]:
    return list(range(ref["start"], ref["start"] + PER_SHARD))


class FaultStage(Stage):
    """Two records per number (the second rejected). Sleeps ``delay`` per chunk and appends ``pid
    numbers...`` to ``log`` once a chunk is done; while the file ``attempts`` counts fewer than
    ``fail_times`` calls on a chunk holding ``fail_on``, that chunk raises."""

    name = "fault"

    def __init__(
        self, delay: float = 0.0, log: str = "", fail_on: int = -1, attempts: str = "", fail_times: int = 0
    ):
        self.delay, self.log = delay, log
        self.fail_on, self.attempts, self.fail_times = fail_on, attempts, fail_times

    def process(self, items: list[int]) -> list[StageOutput]:
        if self.fail_on in items:
            counter = Path(self.attempts)
            count = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(count + 1))
            if count < self.fail_times:
                raise RuntimeError(f"injected failure {count + 1}")
        time.sleep(self.delay)
        outputs = []
        for number in items:
            outputs.append(StageOutput(new_record("n", f"{number}/a", scores={"n": float(number)})))
            outputs.append(StageOutput(reject(new_record("n", f"{number}/b"), RejectReason.DUPLICATE)))
        if self.log:
            with open(self.log, "a") as handle:
                handle.write(" ".join(map(str, [os.getpid(), *items])) + "\n")
        return outputs


def phase(out: Path, **stage_kwargs: Any) -> Phase:
    return Phase(
        label="faults",
        out_dir=out,
        tasks=[ShardTask(f"{index:06d}", {"start": index * PER_SHARD}) for index in range(SHARDS)],
        read_task=read_numbers,
        stages=[stage(FaultStage, **stage_kwargs)],
        resources=Resources(concurrency=1, num_cpus=0.5, batch_size=2, retries=0),
        with_images=False,
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return sorted(read_records(out), key=lambda record: record["key"])


def chunks_done(log: Path) -> list[tuple[int, list[int]]]:
    """``(pid, numbers)`` of every chunk the stage finished, in order."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines() if line]
    return [(int(pid), [int(number) for number in numbers]) for pid, *numbers in lines]


def own_ray_processes(prefix: str) -> list[psutil.Process]:
    """Processes of this test's local Ray (descendants of this process) whose title starts with
    ``prefix``; another cluster's workers on this machine are never candidates."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline()).strip()
        except psutil.Error:
            continue
        if title.startswith(prefix):
            found.append(process)
    return found


class Killer(threading.Thread):
    """SIGKILLs the one process titled ``prefix`` once ``ready()`` is true, while the phase runs."""

    def __init__(self, prefix: str, ready):  # noqa: ANN001 - a predicate
        super().__init__(daemon=True)
        self.prefix, self.ready = prefix, ready
        self.killed: psutil.Process | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                processes = own_ray_processes(self.prefix)
                if len(processes) == 1:
                    self.killed = processes[0]
                    os.kill(self.killed.pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    def run_phase(self, phase_: Phase) -> PhaseResult:
        self.start()
        try:
            return run_phase(phase_)
        finally:
            self.stop.set()
            self.join(timeout=10)


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_phase(phase(out))
    assert (result.written, result.failed) == (SHARDS, {})
    records = rows(out)
    assert len(records) == SHARDS * PER_SHARD * 2
    return records


def test_a_stage_worker_killed_mid_shard_is_restarted_and_the_run_commits_every_shard(
    local_ray, uninterrupted, tmp_path
):
    out, log = tmp_path / "out", tmp_path / "chunks.log"
    at_kill: dict[str, Any] = {}

    def mid_shard() -> bool:
        """Three chunks done: the worker is busy with a shard's second chunk or the next shard."""
        done = chunks_done(log)
        if len(done) < 3:
            return False
        at_kill.update(chunks=len(done), committed=len(committed_shards(out)))
        return True

    killer = Killer(STAGE_WORKER, mid_shard)
    result = killer.run_phase(phase(out, delay=0.4, log=str(log)))

    assert killer.killed is not None, "the stage worker was never killed"
    assert not killer.killed.is_running()
    assert at_kill["chunks"] < CHUNKS and at_kill["committed"] < SHARDS  # the kill was mid-phase
    done = chunks_done(log)
    after_kill = [numbers for pid, numbers in done if pid != killer.killed.pid]
    assert after_kill, "no chunk was processed by a restarted worker"
    # Every chunk was done at least once, and only the one in flight at the kill could be done twice.
    processed = Counter(number for _, numbers in done for number in numbers)
    assert set(processed) == set(range(SHARDS * PER_SHARD))
    assert len(done) <= CHUNKS + 1

    assert (result.written, result.skipped, result.failed) == (SHARDS, 0, {})
    assert committed_shards(out) == [f"{index:06d}" for index in range(SHARDS)]
    assert not (out / TMP_DIR).exists()
    assert rows(out) == uninterrupted


def test_a_killed_committer_is_restarted_and_the_run_commits_every_shard(local_ray, uninterrupted, tmp_path):
    out = tmp_path / "out"
    at_kill: dict[str, int] = {}

    def first_commit() -> bool:
        at_kill["committed"] = len(committed_shards(out))
        return at_kill["committed"] >= 1

    killer = Killer(COMMITTER, first_commit)
    result = killer.run_phase(phase(out, delay=0.4))

    assert killer.killed is not None, "the committer was never killed"
    assert at_kill["committed"] < SHARDS
    # The committer is restarted and its commit retried (a commit that had finished keeps its stats).
    assert (result.written, result.failed) == (SHARDS, {})
    assert committed_shards(out) == [f"{index:06d}" for index in range(SHARDS)]
    assert not (out / TMP_DIR).exists()
    assert rows(out) == uninterrupted


def test_a_shard_failing_twice_is_recorded_each_run_and_committed_by_the_third(
    local_ray, uninterrupted, tmp_path
):
    out, log, attempts = tmp_path / "out", tmp_path / "chunks.log", tmp_path / "attempts"
    failing = "000002"
    flaky = phase(out, log=str(log), fail_on=2 * PER_SHARD, attempts=str(attempts), fail_times=2)
    others = [f"{index:06d}" for index in range(SHARDS) if f"{index:06d}" != failing]

    first = run_phase(flaky)
    assert (
        list(first.failed) == [failing] and "fault: RuntimeError: injected failure 1" in first.failed[failing]
    )
    assert (first.written, first.skipped) == (SHARDS - 1, 0)
    assert committed_shards(out) == others
    committed_at = {name: stats_path(out, name).stat().st_mtime_ns for name in others}
    first_rows = rows(out)

    second = run_phase(flaky)
    assert list(second.failed) == [failing] and "injected failure 2" in second.failed[failing]
    assert (second.written, second.skipped) == (0, SHARDS - 1)
    assert rows(out) == first_rows

    third = run_phase(flaky)
    assert (third.written, third.skipped, third.failed) == (1, SHARDS - 1, {})
    assert attempts.read_text() == "3"

    # The other shards were committed once, by run 1, and never processed again.
    assert {name: stats_path(out, name).stat().st_mtime_ns for name in others} == committed_at
    processed = Counter(number for _, numbers in chunks_done(log) for number in numbers)
    failing_numbers = set(range(2 * PER_SHARD, 3 * PER_SHARD))
    assert all(
        processed[number] == 1 for number in range(SHARDS * PER_SHARD) if number not in failing_numbers
    )
    assert processed[2 * PER_SHARD] == 1  # the failing chunk: only its third (successful) attempt
    assert processed[2 * PER_SHARD + 2] == 3  # the shard's other chunk: once in each run
    assert not (out / TMP_DIR).exists()
    assert rows(out) == uninterrupted
