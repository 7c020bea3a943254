"""A small two-phase job on the step framework, for tests: ``python -m tests.fanout_job OUT [--delay S]``.

Map phase: 6 shards of 5 numbers; a CPU ``prepare`` stage squares each number, a ``fanout`` stage emits
3 records per number (one of them rejected). Reduce phase: per-shard totals over the committed shards.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from infu.config import Resources
from infu.records import RejectReason, new_record, reject
from infu.runner import Phase, ShardTask, Stage, StageOutput, run_phase, run_reduce, stage
from infu.shards import read_records

SHARDS = 6
PER_SHARD = 5


def read_numbers(ref: dict[str, Any]) -> list[int]:
    return list(range(ref["start"], ref["start"] + PER_SHARD))


class PrepareStage(Stage):
    name = "prepare"
    one_to_one = True

    def process(self, items: list[int]) -> list[dict[str, int]]:
        return [{"number": number, "square": number * number} for number in items]


class FanOutStage(Stage):
    name = "fanout"
    uses_gpu = True

    def __init__(self, delay: float):
        self.delay = delay

    def process(self, items: list[dict[str, int]]) -> list[StageOutput]:
        time.sleep(self.delay)
        outputs = []
        for item in items:
            for copy in range(3):
                record = new_record("numbers", f"{item['number']}/{copy}", scores={"square": item["square"]})
                if copy == 2:
                    reject(record, RejectReason.DUPLICATE, "third copy")
                outputs.append(StageOutput(record))
        return outputs


def totals(phase_dir: Path, folder: Path) -> dict[str, Any]:
    records = read_records(phase_dir)
    by_shard: dict[str, float] = {}
    for record in records:
        by_shard[record["shard"]] = by_shard.get(record["shard"], 0.0) + record["scores"]["square"]
    table = pa.table({"shard": list(by_shard), "total": list(by_shard.values())})
    pq.write_table(table, folder / "totals.parquet")
    return {"records": len(records)}


def run(out: Path, delay: float) -> dict[str, Any]:
    tasks = [ShardTask(f"{index:06d}", {"start": index * PER_SHARD}) for index in range(SHARDS)]
    result = run_phase(
        Phase(
            label="fanout",
            out_dir=out / "map",
            tasks=tasks,
            read_task=read_numbers,
            stages=[stage(PrepareStage), stage(FanOutStage, delay=delay)],
            resources=Resources(concurrency=1, num_cpus=0.5, batch_size=2),
            extra_stats={"identity": "test"},
            with_images=False,
        )
    )
    reduced = run_reduce(out / "reduce", "test", lambda folder: totals(out / "map", folder))
    return {"failed": result.failed, "written": result.written, "skipped": result.skipped, "reduce": reduced}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.delay)))
