"""The ``infu`` command line: build the sample corpus, run a step or the whole flow, check configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infu.config import load_config_or_exit
from infu.model.cli import generate_command

app = typer.Typer(
    help="InfU data engine and training orchestration.", no_args_is_help=True, pretty_exceptions_enable=False
)
config_app = typer.Typer(help="Run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="run config YAML")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")]


@app.command("sample-corpus")
def sample_corpus(out: Annotated[Path, typer.Argument(help="folder to write the corpus into")]) -> None:
    """Build the embedded sample corpus (package photos + labelled bad-input variants)."""
    from infu.sample_corpus import build_sample_corpus

    labels = build_sample_corpus(out)
    typer.echo(f"wrote {len(labels)} files, labels.jsonl and captions.jsonl to {out}")


@app.command()
def ingest(config: ConfigOption = Path("configs/embedded.yaml"), set_: SetOption = None) -> None:
    """Run the ingest step as a Ray job (local Ray, or run.ray_address) without Prefect."""
    from flows.steps import ray_cluster, run_step

    run_config = load_config_or_exit(config, set_)
    with ray_cluster(run_config) as (address, local):
        out_dir = run_step(run_config, "ingest", address, local)
    typer.echo(f"ingest shards: {out_dir}")


@app.command()
def run(
    config: ConfigOption = Path("configs/embedded.yaml"),
    set_: SetOption = None,
    step: Annotated[list[str] | None, typer.Option(help="run only these steps")] = None,
) -> None:
    """Run the full-pipeline Prefect flow: every configured step as a Ray job."""
    load_config_or_exit(config, set_)
    from flows.full_pipeline import full_pipeline

    results = full_pipeline(config=str(config), overrides=set_ or [], steps=step or None)
    typer.echo(json.dumps(results, indent=2))
    for name, result in results.items():
        typer.echo(f"{name} output: {result['output']}")


app.command("generate")(generate_command)


@config_app.command("validate")
def validate(config: Annotated[Path, typer.Argument(help="run config YAML")], set_: SetOption = None) -> None:
    """Check a run config; print its steps and their config hashes."""
    from flows.steps import configured_steps

    run_config = load_config_or_exit(config, set_)
    typer.echo(f"{config}: valid ({run_config.run.profile} profile, run dir {run_config.run.run_dir})")
    for name in configured_steps(run_config):
        typer.echo(f"  {name}: config hash {run_config.step_hash(name)[:12]}")


if __name__ == "__main__":
    app()
