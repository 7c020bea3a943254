"""The ``full-pipeline`` Prefect flow: the configured steps, in order, each as one Ray job.

Per step, a task runs the step's job (unless its output folder is complete for this config), retried
``run.job_retries`` times when the job fails, with a progress artifact while the job runs and a table
artifact of its counts and timings after. Every flow run ends by writing the run's data-quality
dashboard (:mod:`flows.dashboard`) and linking it as an artifact.
"""

from __future__ import annotations

import contextvars
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.dashboard import write_snapshot
from flows.steps import ray_cluster, run_step
from infu.config import InfuConfig, load_config, redact_secrets, refuse_credentials
from infu.lineage import completed_manifest
from infu.manifest import read_manifest
from infu.progress import latest_progress, percent
from infu.steps import select_steps

PROGRESS_POLL_S = 5.0


def artifact_key(config: InfuConfig, *parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes): ``<run name>-<parts>``."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join((config.run.name, *parts)).lower())


@contextmanager
def progress_artifact(config: InfuConfig, step: str) -> Iterator[None]:
    """A progress artifact of ``step``, updated from its output's ``_progress.json`` while the job runs."""
    artifact = create_progress_artifact(
        0.0, key=artifact_key(config, step, "progress"), description=f"{step}: starting"
    )
    stopped = threading.Event()
    step_dir = config.step_dir(step)

    def report() -> None:
        record = latest_progress(step_dir)
        if record is not None:
            description = f"{record['label']}: {record['done']}/{record['total']} {record['unit']}"
            update_progress_artifact(artifact, percent(record), description=description)

    def poll() -> None:
        while not stopped.wait(PROGRESS_POLL_S):
            report()

    # The thread runs in this task's context: the Prefect client settings (a temporary server's too).
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(poll,), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopped.set()
        watcher.join()
        report()  # where the job got to, also when it failed (a retry gets an artifact of its own)
    update_progress_artifact(artifact, 100.0)


def step_table(manifest: dict[str, Any], ran: bool, out_dir: Path) -> list[dict[str, Any]]:
    """The rows of a step's table artifact: what ran, samples in and out, reject reasons, timings, where."""
    counts = manifest.get("counts") or {}
    rows = [{"measure": "job", "value": "ran" if ran else "skipped (output complete)"}]
    rows += [
        {"measure": name, "value": counts[name]} for name in ("samples", "ok", "rejected") if name in counts
    ]
    rows += [
        {"measure": f"rejected: {reason}", "value": n} for reason, n in (counts.get("reasons") or {}).items()
    ]
    for name in ("steps", "failed_shards"):
        if manifest.get(name):
            rows.append({"measure": name.replace("_", " "), "value": manifest[name]})
    seconds = (manifest.get("timings") or {}).get("seconds")
    if seconds is not None:
        rows.append({"measure": "seconds", "value": seconds})
    rows.append({"measure": "output", "value": str(out_dir)})
    return rows


@task(name="step", task_run_name="{step}")
def step_task(step: str, config: str, overrides: list[str], address: str, local: bool) -> dict[str, Any]:
    """Run one step's Ray job (unless its output is complete) and return its output folder and counts."""
    logger = get_run_logger()
    run_config = load_config(config, overrides)
    out_dir = run_config.step_dir(step)
    pending = completed_manifest(run_config, step) is None
    with progress_artifact(run_config, step) if pending else nullcontext():
        ran = run_step(run_config, step, address, local, log=logger.info)
    manifest = read_manifest(out_dir) or {}
    create_table_artifact(
        step_table(manifest, ran, out_dir),
        key=artifact_key(run_config, step),
        description=f"**{step}**: counts, reject reasons and timings of {out_dir}",
    )
    return {"output": str(out_dir), "counts": manifest.get("counts"), "skipped": not ran}


@task(name="dashboard", task_run_name="dashboard")
def dashboard_task(config: str, overrides: list[str]) -> str:
    """Write the run's data-quality dashboard and link it; returns its path."""
    run_config = load_config(config, overrides)
    path = write_snapshot(run_config.run.run_dir)
    create_link_artifact(
        path.resolve().as_uri(),
        link_text="data-quality dashboard",
        key=artifact_key(run_config, "dashboard"),
        description=f"Snapshot of {run_config.run.run_dir}; `infu dashboard {run_config.run.run_dir}` serves "
        "the interactive one",
    )
    return str(path)


def run_steps(
    config: str,
    overrides: list[str],
    only: list[str] | None = None,
    start_from: str | None = None,
    stop_after: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Connect to (or start) Ray when a step has work, run the selected steps (:func:`select_steps`) in
    order, then write the dashboard."""
    refuse_credentials(overrides, "the flow parameter `overrides`")
    run_config = load_config(config, overrides)
    steps = select_steps(run_config, only, start_from, stop_after)
    retried = step_task.with_options(
        retries=run_config.run.job_retries, retry_delay_seconds=run_config.run.retry_delay_s
    )
    results: dict[str, dict[str, Any]] = {}
    pending = [step for step in steps if completed_manifest(run_config, step) is None]
    cluster = ray_cluster(run_config) if pending else nullcontext(("", False))
    with cluster as (address, local):
        where = (
            f"to run on Ray at {redact_secrets(address)}: {', '.join(pending)}"
            if pending
            else "all complete, nothing to run"
        )
        print(f"steps {', '.join(steps)}; {where}")
        for step in steps:
            results[step] = retried(step, config, overrides, address, local)
            state = "complete already, skipped" if results[step]["skipped"] else "done"
            print(f"{step}: {state}: {results[step]['output']} {results[step]['counts']}")
    dashboard = dashboard_task(config, overrides)
    print(f"dashboard: {dashboard} (serve it: infu dashboard {run_config.run.run_dir})")
    return results


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(
    config: str = "configs/embedded.yaml",
    overrides: list[str] | None = None,
    steps: list[str] | None = None,
    start_from: str | None = None,
    stop_after: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Every configured step (or only ``steps``), from ``start_from`` to ``stop_after``, as Ray jobs.

    Finished steps are skipped: a step reruns when its settings or those of a step before it changed.
    Prefect stores the parameters: credentials go in environment variables referenced as ``${env:NAME}``
    (``infu run`` moves those of ``--set`` there itself)."""
    return run_steps(config, overrides or [], steps, start_from, stop_after)


if __name__ == "__main__":
    full_pipeline()
