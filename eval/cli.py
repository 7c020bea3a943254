"""``python -m eval``: the evaluation steps as Ray jobs (from the step registry), and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infu.config import load_config_or_exit
from infu.steps import exit_on_error, job_app

app = job_app("eval")


@app.command()
def report(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config YAML")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")] = None,
) -> None:
    """Print the evaluation report's tables and where its HTML and galleries are."""
    from eval.score import REPORT_DIR, STEP

    run_config = load_config_or_exit(config, set_)
    folder = run_config.step_dir(STEP) / REPORT_DIR
    with exit_on_error("report"):
        if not (folder / "report.md").is_file():
            raise FileNotFoundError(
                2, "no report yet (run python -m eval score first)", str(folder / "report.md")
            )
        typer.echo((folder / "report.md").read_text())
        typer.echo(f"HTML report: {folder / 'report.html'}")
