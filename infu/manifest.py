"""``_manifest.json``: what a step output folder holds and how it was made."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import infu
from infu.config import InfuConfig, dump_config
from infu.shards import read_stats

MANIFEST_NAME = "_manifest.json"


class OutputMismatchError(RuntimeError):
    """A step output folder was made with a different config than the one asked to resume into it."""


def code_version() -> dict[str, str | None]:
    """Package version and, when run from a git checkout, the commit (with ``-dirty`` if modified)."""
    root = Path(__file__).resolve().parents[1]
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": infu.__version__, "git": commit, "python": platform.python_version()}


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


def check_resumable(out_dir: Path, step: str, config_hash: str) -> None:
    """Refuse to mix shards of different configs in one folder."""
    manifest = read_manifest(out_dir)
    if manifest and manifest.get("config_hash") != config_hash:
        raise OutputMismatchError(
            f"{out_dir} holds {step} output made with config hash {manifest.get('config_hash', '?')[:12]}, "
            f"but this run's config hashes to {config_hash[:12]}: "
            "use another run.run_dir, or delete the folder"
        )


def summarize(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for stats in shard_stats:
        reasons.update(stats["reasons"])
    return {
        "shards": len(shard_stats),
        "samples": sum(stats["count"] for stats in shard_stats),
        "ok": sum(stats["ok"] for stats in shard_stats),
        "rejected": sum(stats["rejected"] for stats in shard_stats),
        "reasons": dict(sorted(reasons.items())),
        "image_bytes": sum(stats["image_bytes"] for stats in shard_stats),
    }


def write_manifest(out_dir: Path, **fields: Any) -> dict[str, Any]:
    """Atomically (re)write the manifest; ``fields`` hold step, inputs, config, counts, timings..."""
    manifest = {"written_at": time.time(), "code": code_version(), **fields}
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return manifest


@dataclass(frozen=True)
class StepOutput:
    """A step's output folder for this run, opened by :func:`open_step_output`."""

    out_dir: Path
    config_hash: str
    common: dict[str, Any]
    started: float

    def complete(self, **fields: Any) -> dict[str, Any]:
        """Mark the output complete: counts of its committed shards, timings and ``fields``."""
        return write_manifest(
            self.out_dir,
            status="complete",
            counts=summarize(read_stats(self.out_dir)),
            timings={"started": self.started, "seconds": round(time.time() - self.started, 3)},
            **fields,
            **self.common,
        )


def open_step_output(config: InfuConfig, step: str, section: BaseModel, **inputs: Any) -> StepOutput:
    """Create or resume ``step``'s output folder: refuse another config's shards, record the run as
    running with its effective config (``_config.yaml``) and ``inputs``."""
    out_dir = config.step_dir(step)
    config_hash = config.step_hash(step)
    check_resumable(out_dir, step, config_hash)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"step": step, "config_hash": config_hash, "config": section.model_dump(mode="json")}
    write_manifest(out_dir, status="running", inputs=inputs, **common)
    (out_dir / "_config.yaml").write_text(dump_config(config))
    return StepOutput(out_dir, config_hash, common, time.time())
