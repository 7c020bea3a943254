"""Ingest: a raw source -> raw shards (original bytes + one record per input file).

Every input file becomes a record: readable images are kept with their size and mime; unreadable
files, non-images, corrupt or truncated images, decompression bombs and tiny images are rejected
with a reason. A rerun skips the shards already committed.
"""

from __future__ import annotations

import hashlib
import time
from functools import partial
from typing import Any

from filtering.sources import Source, open_source
from infu.config import InfuConfig, IngestConfig, dump_config
from infu.images import BadImageError, probe_image
from infu.manifest import check_resumable, summarize, write_manifest
from infu.records import RejectReason, new_record, reject
from infu.runner import ShardTask, Stage, StageOutput, batched, run_shards
from infu.shards import read_stats, shard_name

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
    out_dir = config.step_dir(STEP)
    config_hash = config.step_hash(STEP)
    check_resumable(out_dir, STEP, config_hash)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(ingest.source)
    common = {"step": STEP, "config_hash": config_hash, "config": ingest.model_dump(mode="json")}
    write_manifest(out_dir, status="running", **common)
    (out_dir / "_config.yaml").write_text(dump_config(config))
    tasks = (
        ShardTask(shard_name(index), items)
        for index, items in enumerate(batched(source.iter_items(), ingest.shard_size))
    )
    started = time.time()
    run = run_shards(
        out_dir,
        tasks,
        partial(IngestStage, ingest),
        ingest.resources,
        label=STEP,
        extra_stats={"config_hash": config_hash},
    )
    return write_manifest(
        out_dir,
        status="complete",
        inputs=source.describe(),
        counts=summarize(read_stats(out_dir)),
        timings={"started": started, "seconds": round(time.time() - started, 3)},
        run=run,
        **common,
    )
