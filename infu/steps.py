"""The step registry, and the job entrypoint every step package exposes.

Each step package declares its :class:`StepSpec` objects in its own code (its config section model, its
upstream steps, the shared sections it reads, the function that runs it) and registers them with one
entry point each in ``pyproject.toml``::

    [project.entry-points."infu.steps"]
    ingest = "filtering.spec:INGEST"

:class:`~infu.config.InfuConfig`, the flows and the CLI are built from :func:`registry`, so adding a step
touches only its package plus that registration. ``infu`` never imports a step package by name: specs
are found through the entry points.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel

ENTRY_POINT_GROUP = "infu.steps"


class StepError(RuntimeError):
    """A step that cannot run as configured (missing input, unreadable source...); its message says why."""


@dataclass(frozen=True)
class StepSpec:
    """What the rest of the system needs to know about a step."""

    name: str
    """Step name: its output folder under ``run.run_dir`` and its command in ``python -m <package>``."""
    package: str
    """The package whose ``__main__`` runs it as a Ray job: ``python -m <package> <name> --config FILE``."""
    section: str
    """Its config section (several steps may share one)."""
    section_model: type[BaseModel]
    run: str
    """``"module:function"``: called with the loaded config, returns the step's manifest."""
    upstream: tuple[str, ...] = ()
    """Steps whose outputs it reads: their identities are part of its own."""
    shared: tuple[str, ...] = ()
    """Shared config sections (face, model, quality) whose settings change its output."""
    input_field: str | None = None
    """A section field that, when set, points at an input folder replacing the (single) upstream output."""
    help: str = ""
    command: str = ""
    """Its command in ``python -m <package> <command>`` when not its name (``datagen filter`` is ``spms``)."""
    feeds: tuple[str, ...] = ()
    """Steps that read its output when it is there (an optional input, never part of their identity): it
    runs before them."""

    def job_arguments(self) -> list[str]:
        """``["-m", package, command]``: what follows ``python`` in the step's Ray job entrypoint."""
        return ["-m", self.package, self.command or self.name]

    def runner(self) -> Any:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


@functools.cache
def registry() -> dict[str, StepSpec]:
    """Every registered step, in pipeline order (upstream steps first, then by name)."""
    specs: dict[str, StepSpec] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        spec = entry.load()
        if not isinstance(spec, StepSpec) or spec.name != entry.name:
            raise TypeError(
                f"entry point {entry.name} = {entry.value} is not the StepSpec named {entry.name}"
            )
        if spec.name in specs:
            raise TypeError(f"step {spec.name} is registered twice")
        specs[spec.name] = spec
    ordered: dict[str, StepSpec] = {}
    fed_by = {name: [other for other, spec in specs.items() if name in spec.feeds] for name in specs}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in path:
            raise TypeError(f"steps depend on each other in a cycle: {' -> '.join((*path, name))}")
        if name not in specs:
            raise TypeError(f"step {path[-1]} reads the output of {name}, which no package registers")
        for upstream in (*specs[name].upstream, *sorted(fed_by[name])):
            visit(upstream, (*path, name))
        ordered[name] = specs[name]

    for name in sorted(specs):
        visit(name, ())
    return ordered


def get_step(name: str) -> StepSpec:
    try:
        return registry()[name]
    except KeyError:
        raise StepError(f"unknown step {name!r}; registered steps: {', '.join(registry())}") from None


def pipeline_order() -> list[str]:
    return list(registry())


def configured_steps(config: Any) -> list[str]:
    """The registered steps that ``config`` has a section for, in pipeline order."""
    return [name for name in registry() if config.has_step(name)]


def select_steps(
    config: Any,
    only: list[str] | None = None,
    start_from: str | None = None,
    stop_after: str | None = None,
) -> list[str]:
    """The steps a run does, in pipeline order: ``only`` those (default: every configured step), from
    ``start_from`` to ``stop_after`` included. A step that is not registered, not configured, or a range
    that selects nothing is a :class:`StepError`."""
    configured = configured_steps(config)
    for name in [*(only or []), *filter(None, (start_from, stop_after))]:
        get_step(name)
        if name not in configured:
            raise StepError(f"step {name} has no section in this config; its steps: {', '.join(configured)}")
    first = configured.index(start_from) if start_from else 0
    last = configured.index(stop_after) if stop_after else len(configured) - 1
    if first > last:
        raise StepError(f"start_from {start_from} comes after stop_after {stop_after}")
    selected = [name for name in configured[first : last + 1] if only is None or name in only]
    if not selected:
        raise StepError("these settings select no step")
    return selected


def ensure_run_dir(config: Any) -> None:
    """Create ``run.run_dir`` and check that files can be written in it; a :class:`StepError` names it
    otherwise."""
    run_dir = config.run.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise StepError(f"run.run_dir {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise StepError(f"run.run_dir {run_dir} is not writable ({error.strerror or error})") from None


@contextmanager
def exit_on_error(prefix: str, runtime_errors: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """End a command with one line on stderr (credentials redacted), no traceback: status 2 for a config
    or usage error (:class:`StepError`, ``ConfigError``), 1 for a runtime one (``OSError``,
    ``runtime_errors``)."""
    from infu.config import ConfigError, redact_secrets

    def fail(message: object, status: int) -> NoReturn:
        print(redact_secrets(f"{prefix}: {message}"), file=sys.stderr)
        raise SystemExit(status) from None

    try:
        yield
    except (StepError, ConfigError) as error:
        fail(error, 2)
    except OSError as error:
        fail(f"{error.strerror}: {error.filename}" if error.strerror and error.filename else error, 1)
    except runtime_errors as error:
        fail(error, 1)


def run_step_here(config: Any, name: str) -> dict[str, Any]:
    """Run step ``name`` in this process (inside its Ray job) unless its output is complete already."""
    from infu.lineage import completed_manifest

    manifest = completed_manifest(config, name)
    if manifest is not None:
        identity = manifest["identity"][:12]
        print(f"{name}: {config.step_dir(name)} is complete for identity {identity}; nothing to do")
        return manifest
    ensure_run_dir(config)
    return get_step(name).runner()(config)


def job_app(package: str) -> typer.Typer:
    """The ``python -m <package>`` command line: one command per step the package registers."""
    from infu.config import load_config_or_exit

    specs = [spec for spec in registry().values() if spec.package == package]
    app = typer.Typer(
        help=f"{package} steps; each runs as one Ray job.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )

    def command(spec: StepSpec) -> None:
        def run(
            config: Annotated[Path, typer.Option("--config", "-c", help="run config YAML")],
            set_: Annotated[
                list[str] | None, typer.Option("--set", help="override a key: section.key=value")
            ] = None,
        ) -> None:
            run_config = load_config_or_exit(config, set_)
            with exit_on_error(spec.name):
                manifest = run_step_here(run_config, spec.name)
            summary = {"output": str(run_config.step_dir(spec.name)), "counts": manifest.get("counts")}
            typer.echo(json.dumps(summary))
            failed = manifest.get("failed_shards") or {}
            if failed:
                for shard, error in sorted(failed.items()):
                    print(f"{spec.name}: shard {shard} failed: {error}", file=sys.stderr)
                print(f"{spec.name}: {len(failed)} shard(s) failed; rerun to retry them", file=sys.stderr)
                raise SystemExit(1)

        run.__doc__ = spec.help
        app.command(spec.command or spec.name)(run)

    for spec in specs:
        command(spec)

    @app.callback()
    def main() -> None:
        pass

    main.__doc__ = f"{package} steps."
    return app
