"""``python -m training``: the training steps as Ray jobs (from the step registry), and ``plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infu.config import load_config_or_exit
from infu.steps import job_app

app = job_app("training")


@app.command()
def plan(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config YAML")],
    step: Annotated[str, typer.Option(help="the training section to plan")] = "stage1",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")] = None,
) -> None:
    """Per-GPU memory, FLOPs per sample and days for the configured steps at the stated MFU."""
    from training.plan import format_plan, plan_training

    run_config = load_config_or_exit(config, set_)
    settings = run_config.step(step)
    report = plan_training(
        settings.plan,
        factor=run_config.model.infusenet_factor,
        projection=run_config.model.projection,
        global_batch=settings.global_batch,
        micro_batch=settings.data.micro_batch,
        steps=settings.steps,
        activation_checkpointing=settings.activation_checkpointing,
    )
    typer.echo(format_plan(report))
