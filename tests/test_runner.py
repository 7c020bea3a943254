"""The step framework's runner: streaming phases with fan-out, failures kept per shard, reduce phases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from infu.config import Resources, StageResources
from infu.records import new_record
from infu.runner import (
    REDUCE_MARKER,
    Phase,
    ShardTask,
    Stage,
    StageOutput,
    fused_operators,
    run_phase,
    run_reduce,
    stage,
)
from infu.shards import TMP_DIR, committed_shards, read_records, read_stats

from . import fanout_job
from .conftest import PROJECT_ROOT, kill_job_midway


def number_records(ref: dict[str, Any]) -> list[int]:
    if ref.get("unreadable"):
        raise OSError(f"listing of {ref['start']} is gone")
    return list(range(ref["start"], ref["start"] + ref.get("count", 4)))


class RecordStage(Stage):
    """One record per number; fails on ``fail_on``, the first ``flaky_times`` calls (counted in a file)."""

    name = "record"

    def __init__(self, fail_on: int = -1, flaky_file: str = "", flaky_times: int = 0, extra: bool = False):
        self.fail_on, self.flaky_file, self.flaky_times, self.extra = fail_on, flaky_file, flaky_times, extra

    def process(self, items: list[int]) -> list[StageOutput]:
        if self.flaky_file:
            calls = Path(self.flaky_file)
            count = int(calls.read_text()) if calls.exists() else 0
            calls.write_text(str(count + 1))
            if count < self.flaky_times:
                raise RuntimeError(f"flaky call {count + 1}")
        if self.fail_on in items:
            raise ValueError(f"boom {self.fail_on}")
        outputs = [StageOutput(new_record("n", str(number))) for number in items]
        return outputs + ([StageOutput(new_record("n", "extra"))] if self.extra else [])


class CheckedRecordStage(RecordStage):
    one_to_one = True


class TeardownStage(RecordStage):
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def teardown(self) -> None:
        Path(self.marker).write_text("torn down")


def phase(out: Path, *stages, tasks=None, retries: int = 0, **overrides: StageResources) -> Phase:
    return Phase(
        label="test",
        out_dir=out,
        tasks=tasks or [ShardTask(f"{index:06d}", {"start": index * 4}) for index in range(3)],
        read_task=number_records,
        stages=list(stages),
        resources=Resources(concurrency=1, num_cpus=0.5, batch_size=2, retries=retries, stages=overrides),
        with_images=False,
    )


def test_a_failing_shard_is_recorded_and_the_others_commit(local_ray, tmp_path):
    result = run_phase(phase(tmp_path, stage(RecordStage, fail_on=5), retries=1))
    assert committed_shards(tmp_path) == ["000000", "000002"]
    assert list(result.failed) == ["000001"]
    assert "record: ValueError: boom 5" in result.failed["000001"]
    assert not (tmp_path / TMP_DIR).exists()
    rerun = run_phase(phase(tmp_path, stage(RecordStage)))
    assert (rerun.written, rerun.skipped, rerun.failed) == (1, 2, {})
    assert [record["source_path"] for record in read_records(tmp_path)] == [str(n) for n in range(12)]


def test_a_flaky_stage_succeeds_within_its_retries(local_ray, tmp_path):
    calls = tmp_path / "calls"
    tasks = [ShardTask("000000", {"start": 0, "count": 2})]
    result = run_phase(
        phase(
            tmp_path / "out", stage(RecordStage, flaky_file=str(calls), flaky_times=2), tasks=tasks, retries=2
        )
    )
    assert result.failed == {} and calls.read_text() == "3"
    assert len(read_records(tmp_path / "out")) == 2


def test_unreadable_input_and_broken_one_to_one_fail_only_their_shard(local_ray, tmp_path):
    tasks = [
        ShardTask("000000", {"start": 0}),
        ShardTask("000001", {"start": 4, "unreadable": True}),
        ShardTask("000002", {"start": 8, "count": 0}),
    ]
    result = run_phase(phase(tmp_path / "a", stage(RecordStage), tasks=tasks))
    assert (
        list(result.failed) == ["000001"] and "read: OSError: listing of 4 is gone" in result.failed["000001"]
    )
    assert [stats["count"] for stats in read_stats(tmp_path / "a")] == [4, 0]

    checked = run_phase(phase(tmp_path / "b", stage(CheckedRecordStage, extra=True), tasks=tasks[:1]))
    assert "returned 3 outputs for 2 items" in checked.failed["000000"]


def test_fan_out_keeps_chunk_order_and_teardown_runs(local_ray, tmp_path):
    marker = tmp_path / "teardown"
    result = run_phase(
        phase(
            tmp_path / "out",
            stage(fanout_job.PrepareStage),
            stage(TeardownStage, marker=str(marker)),
            prepare=StageResources(num_cpus=0.25),  # two operators: items travel between actors
        )
    )
    assert result.written == 3
    assert marker.read_text() == "torn down"


def test_stages_with_equal_resources_fuse_into_one_operator():
    class Model(RecordStage):
        name, uses_gpu = "model", True

    chain = [stage(fanout_job.PrepareStage), stage(RecordStage), stage(Model), stage(RecordStage)]
    on_cpus = Resources(concurrency=2, num_cpus=1)
    assert [len(refs) for refs, _ in fused_operators(chain, on_cpus)] == [4]
    on_gpus = Resources(concurrency=2, num_cpus=1, num_gpus=1)
    assert [(len(refs), wanted) for refs, wanted in fused_operators(chain, on_gpus)] == [
        (2, (2, 1, 0.0, None)),
        (1, (2, 1, 1, None)),
        (1, (2, 1, 0.0, None)),
    ]
    split = on_cpus.model_copy(update={"stages": {"prepare": StageResources(concurrency=4)}})
    assert [len(refs) for refs, _ in fused_operators(chain, split)] == [1, 3]
    own_env = {"pip": ["salesforce-lavis==1.0.2"]}
    chain[2] = stage(Model, runtime_env=own_env)  # an engine with pins of its own never fuses with others
    assert [(len(refs), wanted[3]) for refs, wanted in fused_operators(chain, on_cpus)] == [
        (2, None),
        (1, own_env),
        (1, None),
    ]


def test_reduce_is_built_once_per_identity(tmp_path):
    builds: list[Path] = []

    def build(folder: Path) -> dict[str, Any]:
        builds.append(folder)
        (folder / "out.txt").write_text(str(len(builds)))
        return {"build": len(builds)}

    dest = tmp_path / "global"
    (tmp_path / "global.tmp-dead").mkdir()  # left by a killed run
    assert run_reduce(dest, "a", build)["build"] == 1
    assert run_reduce(dest, "a", build) == {
        **json.loads((dest / REDUCE_MARKER).read_text())["stats"],
        "reused": True,
    }
    assert run_reduce(dest, "b", build)["build"] == 2
    assert (dest / "out.txt").read_text() == "2" and not (tmp_path / "global.tmp-dead").exists()
    assert builds[0].parent == tmp_path and builds[0] != dest


def run_fanout(out: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.fanout_job", str(out), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fan_out_and_reduce_resume_after_sigkill_to_the_same_rows(tmp_path):
    whole = tmp_path / "whole"
    summary = run_fanout(whole)
    assert (summary["written"], summary["failed"], summary["reduce"]["records"]) == (6, {}, 90)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "tests.fanout_job", str(killed), "--delay", "0.5"]
    committed = kill_job_midway(command, killed / "map", after=2)
    assert 2 <= committed < fanout_job.SHARDS
    resumed = run_fanout(killed)
    assert resumed["skipped"] == committed and resumed["written"] == fanout_job.SHARDS - committed

    def rows(out: Path) -> list[dict[str, Any]]:
        return read_records(out / "map")

    assert rows(killed) == rows(whole)
    assert len(rows(whole)) == 90 and sum(row["status"] == "rejected" for row in rows(whole)) == 30
    totals = [pq.read_table(out / "reduce" / "totals.parquet").to_pylist() for out in (whole, killed)]
    assert totals[0] == totals[1]
