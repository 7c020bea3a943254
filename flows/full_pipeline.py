"""The ``full-pipeline`` Prefect flow: every configured step, in order, each as one Ray job."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger, task

from flows.steps import ray_cluster, run_step
from infu.config import load_config, redact_secrets, refuse_credentials
from infu.lineage import completed_manifest
from infu.manifest import read_manifest
from infu.steps import configured_steps


@task(name="step", task_run_name="{step}")
def step_task(step: str, config: str, overrides: list[str], address: str, local: bool) -> dict[str, Any]:
    """Run one step's Ray job (unless its output is complete) and return its output folder and counts."""
    logger = get_run_logger()
    run_config = load_config(config, overrides)
    ran = run_step(run_config, step, address, local, log=logger.info)
    out_dir = run_config.step_dir(step)
    manifest = read_manifest(out_dir) or {}
    return {"output": str(out_dir), "counts": manifest.get("counts"), "skipped": not ran}


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(
    config: str = "configs/embedded.yaml", overrides: list[str] | None = None, steps: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate the run config, connect to (or start) Ray, then run the steps as Ray jobs.

    Prefect stores the parameters: credentials go in environment variables referenced as ``${env:NAME}``
    (``infu run`` moves those of ``--set`` there itself)."""
    overrides = overrides or []
    refuse_credentials(overrides, "the flow parameter `overrides`")
    run_config = load_config(config, overrides)
    selected = steps or configured_steps(run_config)
    results: dict[str, dict[str, Any]] = {}
    pending = [step for step in selected if completed_manifest(run_config, step) is None]
    cluster = ray_cluster(run_config) if pending else nullcontext(("", False))
    with cluster as (address, local):
        where = (
            f"to run on Ray at {redact_secrets(address)}: {', '.join(pending)}"
            if pending
            else "all complete, nothing to run"
        )
        print(f"steps {', '.join(selected)}; {where}")
        for step in selected:
            results[step] = step_task(step, config, overrides, address, local)
            state = "complete already, skipped" if results[step]["skipped"] else "done"
            print(f"{step}: {state}: {results[step]['output']} {results[step]['counts']}")
    return results


if __name__ == "__main__":
    full_pipeline()
