"""Ray job entrypoint of the SPSS data path: ``python -m filtering ingest --config FILE``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infu.config import ConfigError, load_config

app = typer.Typer(help="SPSS data engine steps (each runs as one Ray job).", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="run config YAML")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")]


@app.command()
def ingest(config: ConfigOption, set_: SetOption = None) -> None:
    """Source (image folder or webdataset tars) -> raw shards with one record per input file."""
    from filtering.ingest import run_ingest

    try:
        run_config = load_config(config, set_ or [])
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    manifest = run_ingest(run_config)
    typer.echo(json.dumps({"output": str(run_config.step_dir("ingest")), "counts": manifest["counts"]}))


@app.callback()
def main() -> None:
    """SPSS data engine steps."""


if __name__ == "__main__":
    app()
