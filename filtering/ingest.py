"""Ingest: a raw source -> raw shards (original bytes + one record per input file).

Every input file becomes a record: readable images are kept with their size and mime; unreadable
files, non-images, corrupt or truncated images, decompression bombs and tiny images are rejected
with a reason. A rerun skips the shards already committed.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

from filtering.sources import Source, open_source
from infu.config import InfuConfig, IngestConfig
from infu.images import BadImageError, probe_image
from infu.manifest import open_step_output
from infu.records import RejectReason, new_record, reject
from infu.runner import ShardTask, Stage, StageOutput, batched, run_shards
from infu.shards import shard_name

STEP = "ingest"


class IngestStage(Stage):
    """Reads each item's bytes from the source and checks that they are a usable image."""

    def __init__(self, config: IngestConfig):
        self.config = config
        self.source: Source | None = None

    def setup(self) -> None:
        self.source = open_source(self.config.source)

    def process_batch(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [self._process(item) for item in items]

    def _process(self, item: dict[str, Any]) -> StageOutput:
        assert self.source is not None, "setup() first"
        captions = {"original": item["caption"]} if item.get("caption") else None
        record = new_record(self.config.source.dataset, item["source_path"], captions=captions)
        try:
            data = self.source.read(item)
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


def run_ingest(config: InfuConfig) -> dict[str, Any]:
    """Run the ingest step of ``config`` and return its manifest."""
    ingest = config.step(STEP)
    assert isinstance(ingest, IngestConfig)
    output = open_step_output(config, STEP, ingest)
    source = open_source(ingest.source)
    tasks = (
        ShardTask(shard_name(index), items)
        for index, items in enumerate(batched(source.iter_items(), ingest.shard_size))
    )
    run = run_shards(
        output.out_dir,
        tasks,
        partial(IngestStage, ingest),
        ingest.resources,
        label=STEP,
        extra_stats={"config_hash": output.config_hash},
    )
    return output.complete(inputs=source.describe(), run=run)
