"""The ``full-pipeline`` Prefect flow: every configured step, in order, each as one Ray job."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.steps import configured_steps, ray_cluster, run_step
from infu.config import load_config
from infu.manifest import read_manifest


@task(name="step", task_run_name="{step}")
def step_task(step: str, config: str, overrides: list[str], address: str, local: bool) -> dict[str, Any]:
    """Run one step's Ray job and return its output folder and counts."""
    logger = get_run_logger()
    run_config = load_config(config, overrides)
    out_dir = run_step(run_config, step, address, local, log=logger.info)
    manifest = read_manifest(out_dir) or {}
    return {"output": str(out_dir), "counts": manifest.get("counts")}


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(
    config: str = "configs/embedded.yaml", overrides: list[str] | None = None, steps: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate the run config, connect to (or start) Ray, then run the steps as Ray jobs."""
    overrides = overrides or []
    run_config = load_config(config, overrides)
    selected = steps or configured_steps(run_config)
    results: dict[str, dict[str, Any]] = {}
    with ray_cluster(run_config) as (address, local):
        print(f"running {', '.join(selected)} on Ray at {address}")
        for step in selected:
            results[step] = step_task(step, config, overrides, address, local)
            print(f"{step}: {results[step]['output']} {results[step]['counts']}")
    return results


if __name__ == "__main__":
    full_pipeline()
