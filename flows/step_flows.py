"""One Prefect flow per registered step, named after it: ``prefect deployment run filter/<name>`` reruns
that step alone (its job is skipped when its output is complete for the config)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.full_pipeline import run_steps
from infu.steps import registry


def step_flow(step: str) -> Any:
    """The flow that runs ``step`` alone, as a Ray job, and refreshes the run's dashboard."""

    @flow(
        name=step, description=f"Run the {step} step as a Ray job. {registry()[step].help}", log_prints=True
    )
    def run(config: str = "configs/embedded.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
        return run_steps(config, overrides or [], only=[step])[step]

    return run


# Deployment entrypoints: flows/step_flows.py:<step>_flow
for _step in registry():
    globals()[f"{_step}_flow"] = step_flow(_step)
