"""``_manifest.json``: what a step output folder holds and how it was made."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import infu
from infu.config import InfuConfig, dump_config, redact_secrets
from infu.paths import write_atomic
from infu.shards import STATS_SUFFIX, read_stats
from infu.steps import StepError

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SUPERSEDED_DIR = "_superseded"


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


def supersede_other_output(out_dir: Path, identity: str) -> Path | None:
    """Move a folder holding output of another identity aside, to ``<run_dir>/_superseded/``; returns
    where it went. None when the folder is absent or already this identity's; a folder without any
    committed shard (a run that failed early) is removed instead."""
    if not out_dir.is_dir():
        return None
    manifest = read_manifest(out_dir)
    stats_files = list(out_dir.rglob(f"*{STATS_SUFFIX}"))  # committed shards of every phase
    identities = {manifest.get("identity")} if manifest else set()
    identities |= {json.loads(path.read_text()).get("identity") for path in stats_files}
    if identities <= {identity}:
        return None
    if not stats_files:
        shutil.rmtree(out_dir)  # a run that committed nothing: only its manifest and scratch files
        return None
    old = next((found for found in identities if found and found != identity), None) or "unknown"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = out_dir.parent / SUPERSEDED_DIR / f"{out_dir.name}-{old[:12]}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    out_dir.rename(target)
    return target


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
    """Atomically (re)write the manifest; ``fields`` hold step, inputs, config, counts, timings...
    (credentials in URLs are written redacted)."""
    manifest = {"written_at": time.time(), "code": code_version(), **fields}
    text = redact_secrets(json.dumps(manifest, indent=2, default=str))
    write_atomic(Path(out_dir) / MANIFEST_NAME, text.encode())
    return manifest


@dataclass(frozen=True)
class StepOutput:
    """A step's output folder for this run, opened by :func:`open_step_output`."""

    out_dir: Path
    identity: str
    common: dict[str, Any]
    started: float

    @property
    def shard_stats(self) -> dict[str, str]:
        """Extra stats every shard of this output carries: the identity it was made with."""
        return {"identity": self.identity}

    def complete(
        self,
        failed_shards: dict[str, str] | None = None,
        counts: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Write the final manifest: ``complete``, or ``failed`` naming the shards that failed (a rerun
        redoes them), with ``counts`` (default: of the committed shards), timings and ``fields``."""
        return write_manifest(
            self.out_dir,
            status="failed" if failed_shards else "complete",
            failed_shards=dict(sorted((failed_shards or {}).items())),
            counts=counts if counts is not None else summarize(read_stats(self.out_dir)),
            timings={"started": self.started, "seconds": round(time.time() - self.started, 3)},
            **fields,
            **self.common,
        )


def open_step_output(config: InfuConfig, step: str, section: BaseModel, **inputs: Any) -> StepOutput:
    """Create or resume ``step``'s output folder for this config's identity.

    Output of another identity (a changed setting upstream or here) is moved aside to
    ``<run_dir>/_superseded/`` first, so nothing is lost and nothing stale is reused. The run is recorded
    as running, with its effective config (``_config.yaml``) and ``inputs``.
    """
    out_dir = config.step_dir(step)
    identity = config.step_hash(step)
    moved = supersede_other_output(out_dir, identity)
    if moved is not None:
        log.warning("%s held %s output of another identity; moved it to %s", out_dir, step, moved)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"step": step, "identity": identity, "config": section.model_dump(mode="json")}
    write_manifest(out_dir, status="running", inputs=inputs, **common)
    write_atomic(out_dir / "_config.yaml", dump_config(config).encode())
    return StepOutput(out_dir, identity, common, time.time())


def trained_export(step_dir: Path) -> Path:
    """The InfU checkpoint a completed training step exported: the folder its manifest's ``export``
    names, inside ``step_dir`` (so a run folder that was moved or copied still finds its own)."""
    manifest = read_manifest(step_dir) or {}
    export = manifest.get("export")
    folder = Path(step_dir) / Path(export).name if export else None
    if manifest.get("status") != "complete" or folder is None or not folder.is_dir():
        raise StepError(f"no completed export in {step_dir}: run the {Path(step_dir).name} step first")
    return folder
