"""Ingest: a raw source -> raw shards (original bytes + one record per input file).

Every input file becomes a record, with the dataset's caption, identity and attributes when the source
has them: readable images are kept with their size and mime; unreadable files, non-images, corrupt or
truncated images, decompression bombs and tiny images are rejected with a reason, and so are the
inputs the source refuses (listed with a ``reject`` entry, or refused by its ``read``: special files,
refused symlinks, duplicate tar members, damaged tars). The source is listed once per output identity
into ``_listing/`` (one Parquet of item descriptors per shard), so a rerun cuts exactly the same
shards and skips the committed ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from filtering.config import IngestConfig
from filtering.sources import InputRejected, Source, open_source
from infu.config import InfuConfig
from infu.images import BadImageError, probe_image
from infu.manifest import open_step_output
from infu.records import RejectReason, new_record, reject
from infu.runner import Phase, ShardTask, Stage, StageOutput, batched, run_phase, run_reduce, stage
from infu.shards import shard_name

STEP = "ingest"
LISTING = "_listing"


class IngestStage(Stage):
    """Reads each item's bytes from the source and checks that they are a usable image."""

    name = "read"
    one_to_one = True

    def __init__(self, config: IngestConfig):
        self.config = config
        self.source: Source | None = None

    def setup(self) -> None:
        self.source = open_source(self.config.source)

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [self._process(item) for item in items]

    def _process(self, item: dict[str, Any]) -> StageOutput:
        assert self.source is not None, "setup() first"
        captions = {"original": item["caption"]} if item.get("caption") else None
        record = new_record(
            self.config.source.dataset,
            item["source_path"],
            identity=item.get("identity"),
            attributes=item.get("attributes"),
            captions=captions,
        )
        refused = item.get("reject")
        if refused:
            return StageOutput(reject(record, refused["reason"], refused["detail"]))
        try:
            data = self.source.read(item)
        except InputRejected as error:
            return StageOutput(reject(record, error.reason, error.detail))
        except OSError as error:
            return StageOutput(reject(record, RejectReason.UNREADABLE, str(error)))
        record.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        try:
            info = probe_image(data, self.config.max_pixels)
        except BadImageError as error:
            return StageOutput(reject(record, error.reason, error.detail))
        record.update(width=info.width, height=info.height, mime=info.mime)
        if min(info.width, info.height) < self.config.min_side:
            reject(
                record,
                RejectReason.TOO_SMALL,
                f"{info.width}x{info.height}: shorter side below {self.config.min_side}",
            )
            return StageOutput(record)
        return StageOutput(record, data, info.extension)


def write_listing(source: Source, shard_size: int, folder: Path) -> dict[str, Any]:
    """List the source into ``folder``: ``NNNNNN.parquet`` per shard, one JSON item descriptor a row."""
    shards = 0
    for index, items in enumerate(batched(source.iter_items(), shard_size)):
        table = pa.table({"item": [json.dumps(item) for item in items]})
        pq.write_table(table, folder / f"{shard_name(index)}.parquet")
        shards += 1
    return {"shards": shards, "inputs": source.describe()}


def read_listed_items(ref: dict[str, Any]) -> list[dict[str, Any]]:
    """A listing shard's item descriptors (runs on the workers)."""
    return [json.loads(item) for item in pq.read_table(ref["listing"])["item"].to_pylist()]


def run_ingest(config: InfuConfig) -> dict[str, Any]:
    """Run the ingest step of ``config`` and return its manifest."""
    ingest: IngestConfig = config.step(STEP)
    source = open_source(ingest.source)
    output = open_step_output(config, STEP, ingest)
    listing = run_reduce(
        output.out_dir / LISTING,
        output.identity,
        lambda folder: write_listing(source, ingest.shard_size, folder),
    )
    tasks = [
        ShardTask(
            shard_name(index), {"listing": str(output.out_dir / LISTING / f"{shard_name(index)}.parquet")}
        )
        for index in range(listing["shards"])
    ]
    result = run_phase(
        Phase(
            label=STEP,
            out_dir=output.out_dir,
            tasks=tasks,
            read_task=read_listed_items,
            stages=[stage(IngestStage, config=ingest)],
            resources=ingest.resources,
            extra_stats=output.shard_stats,
        )
    )
    return output.complete(failed_shards=result.failed, inputs=listing["inputs"], run=result.as_dict())
