"""Steps as Ray jobs: the only way flows (and the CLI) run a step.

Each step is a package with a job entrypoint ``python -m <package> <command> --config FILE``. The
effective config is written into the run folder (shared with the cluster), so the job reads exactly
what the flow validated; the Ray submission id is derived from the run name, step and config hash.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infu.config import InfuConfig, dump_config
from infu.raycluster import LocalRay, run_job


@dataclass(frozen=True)
class StepSpec:
    name: str
    package: str
    command: str


STEPS = {
    spec.name: spec
    for spec in [StepSpec("ingest", "filtering", "ingest"), StepSpec("filter", "filtering", "filter")]
}
PIPELINE_ORDER = list(STEPS)


def configured_steps(config: InfuConfig) -> list[str]:
    """The pipeline's steps that this config has a section for, in pipeline order."""
    return [name for name in PIPELINE_ORDER if getattr(config, name, None) is not None]


def effective_config_file(config: InfuConfig, step: str) -> Path:
    """Write the validated config where every cluster node can read it; returns its path."""
    path = config.run.run_dir / "_configs" / f"{step}-{config.step_hash(step)[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config))
    return path


def entrypoint(config: InfuConfig, step: str, config_file: Path, local: bool) -> str:
    spec = STEPS[step]
    python = config.run.python or (sys.executable if local else "python")
    return f"{shlex.quote(python)} -m {spec.package} {spec.command} --config {shlex.quote(str(config_file))}"


@contextmanager
def ray_cluster(config: InfuConfig) -> Iterator[tuple[str, bool]]:
    """The job API address to use, and whether it is a local Ray this process started."""
    if config.run.ray_address:
        yield config.run.ray_address, False
        return
    with LocalRay() as local:
        yield local.dashboard_url, True


def run_step(
    config: InfuConfig, step: str, address: str, local: bool, log: Callable[[str], None] = print
) -> Path:
    """Run ``step`` as a Ray job on ``address``; returns the step's output folder."""
    if step not in STEPS:
        raise KeyError(f"unknown step {step!r}; known: {', '.join(STEPS)}")
    config.step(step)
    config_file = effective_config_file(config, step)
    prefix = f"infu-{config.run.name}-{step}-{config.step_hash(step)[:12]}"
    run_job(
        address,
        entrypoint(config, step, config_file, local),
        prefix,
        timeout_s=config.run.job_timeout_s,
        log=log,
    )
    return config.step_dir(step)
