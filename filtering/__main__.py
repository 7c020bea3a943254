"""Ray job entrypoints of the SPSS data path: ``python -m filtering ingest|filter --config FILE``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infu.config import load_config_or_exit

app = typer.Typer(help="SPSS data engine steps (each runs as one Ray job).", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="run config YAML")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")]


@app.command()
def ingest(config: ConfigOption, set_: SetOption = None) -> None:
    """Source (image folder or webdataset tars) -> raw shards with one record per input file."""
    from filtering.ingest import run_ingest

    run_config = load_config_or_exit(config, set_)
    manifest = run_ingest(run_config)
    typer.echo(json.dumps({"output": str(run_config.step_dir("ingest")), "counts": manifest["counts"]}))


@app.command("filter")
def filter_(config: ConfigOption, set_: SetOption = None) -> None:
    """Raw shards -> SPSS shards: face, quality, safety, bucket, dedup and identity-guard decisions."""
    from filtering.filter import run_filter

    run_config = load_config_or_exit(config, set_)
    manifest = run_filter(run_config)
    typer.echo(json.dumps({"output": str(run_config.step_dir("filter")), "counts": manifest["counts"]}))


@app.callback()
def main() -> None:
    """SPSS data engine steps."""


if __name__ == "__main__":
    app()
