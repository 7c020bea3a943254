"""The ``infu`` command line: build the sample corpus, run a step or the whole flow, check configs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from infu.config import InfuConfig, credentials_to_environment, load_config_or_exit
from infu.model.cli import generate_command
from infu.raycluster import JobFailedError
from infu.steps import configured_steps, ensure_run_dir, exit_on_error, registry, select_steps

# The temporary Prefect server `infu run` starts would report telemetry (and log an ERROR offline).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect gives its temporary server 20 s to start, which a busy node can exceed.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

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


def check_before_starting(config: InfuConfig, steps: list[str]) -> None:
    """Fail before Prefect or Ray start: every step has its section and, when one of them has work to
    do, the run folder is writable and ``run.ray_address`` answers."""
    from infu.lineage import completed_manifest
    from infu.raycluster import probe_address

    for name in steps:
        config.step(name)
    if all(completed_manifest(config, name) is not None for name in steps):
        return
    ensure_run_dir(config)
    if config.run.ray_address:
        probe_address(config.run.ray_address)


def _add_step_command(name: str, help_text: str) -> None:
    def run_one(config: ConfigOption = Path("configs/embedded.yaml"), set_: SetOption = None) -> None:
        from flows.steps import ray_cluster, run_step

        run_config = load_config_or_exit(config, set_)
        with exit_on_error(name, runtime_errors=(JobFailedError,)):
            check_before_starting(run_config, [name])
            with ray_cluster(run_config) as (address, local):
                run_step(run_config, name, address, local)
        typer.echo(f"{name} output: {run_config.step_dir(name)}")

    run_one.__doc__ = (
        f"Run the {name} step as a Ray job (local Ray, or run.ray_address), without Prefect. {help_text}"
    )
    app.command(name)(run_one)


for _spec in registry().values():
    _add_step_command(_spec.name, _spec.help)


@app.command()
def run(
    config: ConfigOption = Path("configs/embedded.yaml"),
    set_: SetOption = None,
    step: Annotated[list[str] | None, typer.Option(help="run only these steps")] = None,
    start_from: Annotated[str | None, typer.Option(help="skip the steps before this one")] = None,
    stop_after: Annotated[str | None, typer.Option(help="end the run after this step")] = None,
) -> None:
    """Run the full-pipeline Prefect flow: every configured step as a Ray job (finished ones are skipped),
    then write the run's dashboard."""
    run_config = load_config_or_exit(config, set_)
    with exit_on_error("run", runtime_errors=(JobFailedError,)):
        check_before_starting(run_config, select_steps(run_config, step, start_from, stop_after))
        from flows.full_pipeline import full_pipeline

        overrides, secrets = credentials_to_environment(set_ or [])
        os.environ.update(secrets)
        results = full_pipeline(
            config=str(config), overrides=overrides, steps=step, start_from=start_from, stop_after=stop_after
        )
    typer.echo(json.dumps(results, indent=2))
    for name, result in results.items():
        typer.echo(f"{name} output: {result['output']}")
    from flows.dashboard import snapshot_path

    run_dir = run_config.run.run_dir
    typer.echo(f"dashboard: {snapshot_path(run_dir)} (interactive: infu dashboard {run_dir})")


@app.command()
def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (run.run_dir)")],
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8765,
    snapshot: Annotated[bool, typer.Option(help="write the HTML snapshot and exit, no server")] = False,
) -> None:
    """Serve the run's data-quality dashboard on 127.0.0.1 (filters, thumbnail pages), or write its
    self-contained HTML snapshot."""
    from flows.dashboard import serve, write_snapshot

    if not run_dir.is_dir():
        typer.echo(f"dashboard: {run_dir} is not a folder", err=True)
        raise typer.Exit(2)
    if snapshot:
        typer.echo(f"wrote {write_snapshot(run_dir)}")
        return
    typer.echo(f"dashboard of {run_dir}: http://127.0.0.1:{port}/ (Ctrl+C stops it)")
    serve(run_dir, port=port)


app.command("generate")(generate_command)


@config_app.command("validate")
def validate(config: Annotated[Path, typer.Argument(help="run config YAML")], set_: SetOption = None) -> None:
    """Check a run config; print its steps and their identities (what their outputs are made from)."""
    run_config = load_config_or_exit(config, set_)
    typer.echo(f"{config}: valid ({run_config.run.profile} profile, run dir {run_config.run.run_dir})")
    for name in configured_steps(run_config):
        typer.echo(f"  {name}: identity {run_config.step_hash(name)[:12]}")


if __name__ == "__main__":
    app()
