"""Lineage: a step's identity, and whether its output folder holds that identity's complete output.

A step's **identity** is the hash of everything that determines its output: its config section
(execution ``resources`` excluded), the shared sections it reads, and the identities of the outputs it
reads (upstream steps of this run, or an input folder named in its section). Changing an ingest setting
changes the identity of ingest and of every step after it; changing only resources changes none; the
run folder is not part of it (another ``run_dir`` is simply another, empty, output location): paths
inside it are hashed relative to it, so an identity depends on neither the run folder nor the working
directory the run was started from.

The output folder's manifest, not a job list, says whether a step is done: ``status: complete`` with
the same identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from infu.config import InfuConfig
from infu.manifest import read_manifest
from infu.steps import get_step


def _digest(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _run_relative(value: Any, run_dir: str) -> Any:
    """``value`` (a JSON-like config dump) with paths inside ``run_dir`` written as ``$run_dir/...``."""
    if isinstance(value, dict):
        return {key: _run_relative(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_run_relative(item, run_dir) for item in value]
    if isinstance(value, str) and (value == run_dir or value.startswith(run_dir + os.sep)):
        return "$run_dir" + value[len(run_dir) :]
    return value


def _folder_identity(folder: Path) -> str | None:
    manifest = read_manifest(folder)
    return manifest.get("identity") if manifest and manifest.get("status") == "complete" else None


def upstream_inputs(config: InfuConfig, name: str) -> dict[str, Path]:
    """The folders step ``name`` reads, by upstream step (its ``input_field`` when set)."""
    spec = get_step(name)
    section = config.step(name)
    explicit = getattr(section, spec.input_field) if spec.input_field else None
    if explicit is not None:
        return {upstream: Path(explicit) for upstream in spec.upstream}
    return {upstream: config.step_dir(upstream) for upstream in spec.upstream}


def step_identity(config: InfuConfig, name: str) -> str:
    """Hash of the step's section (minus resources), its shared sections and its inputs' identities."""
    spec = get_step(name)
    payload: dict[str, Any] = {
        "step": name,
        "section": config.step(name).model_dump(mode="json", exclude={"resources"}),
        "shared": {shared: getattr(config, shared).model_dump(mode="json") for shared in spec.shared},
    }
    inputs = {}
    for upstream, folder in upstream_inputs(config, name).items():
        if folder == config.step_dir(upstream) and config.has_step(upstream):
            inputs[upstream] = step_identity(config, upstream)
        else:
            inputs[upstream] = {"folder": str(folder), "identity": _folder_identity(folder)}
    payload["inputs"] = inputs
    return _digest(_run_relative(payload, str(config.run.run_dir)))


def output_tag(folder: Path) -> str:
    """A short hash of an output location (in Ray submission ids: two run folders never share a job)."""
    return hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]


def completed_manifest(config: InfuConfig, name: str) -> dict[str, Any] | None:
    """The manifest of the step's output if it is complete for this config's identity, else None."""
    manifest = read_manifest(config.step_dir(name))
    if (
        manifest
        and manifest.get("status") == "complete"
        and manifest.get("identity") == config.step_hash(name)
    ):
        return manifest
    return None
