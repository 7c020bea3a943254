"""``_progress.json``: how far a running step is, written by its job and read by the flow.

A map phase writes shards done of its total after every shard; a training loop writes optimiser steps
done of its total. The flow shows the newest one as a Prefect progress artifact while the job runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from infu.paths import write_atomic

PROGRESS_FILE = "_progress.json"


def write_progress(out_dir: Path, label: str, done: int, total: int, unit: str) -> None:
    """Record that ``done`` of ``total`` ``unit`` (shards, steps) of ``label`` are finished."""
    record = {"label": label, "done": done, "total": total, "unit": unit, "updated": time.time()}
    write_atomic(Path(out_dir) / PROGRESS_FILE, json.dumps(record).encode())


def latest_progress(step_dir: Path) -> dict[str, Any] | None:
    """The most recently updated progress record in ``step_dir`` or its phase folders; None before any."""
    records = []
    for path in Path(step_dir).rglob(PROGRESS_FILE):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced or removed while read: the next poll sees it
            continue
    return max(records, key=lambda record: record["updated"], default=None)


def percent(record: dict[str, Any]) -> float:
    return 100.0 * record["done"] / record["total"] if record["total"] else 100.0
