"""Steps as Ray jobs: the only way flows (and the CLI) run a step.

Each registered step (:mod:`infu.steps`) has a job entrypoint ``python -m <package> <step> --config
FILE``. The effective config is written into the run folder (shared with the cluster), so the job reads
exactly what the flow validated. Whether a step is done is decided by its output folder's manifest
(:mod:`infu.lineage`), never by the list of Ray jobs; the submission id names the run, the step, its
identity and its output location, so a rerun follows a job still running instead of starting another.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infu.config import InfuConfig, dump_config
from infu.lineage import completed_manifest, output_tag
from infu.paths import write_atomic
from infu.raycluster import LocalRay, probe_address, run_job
from infu.steps import get_step


def effective_config_file(config: InfuConfig, step: str) -> Path:
    """Write the validated config where every cluster node can read it; returns its path."""
    path = config.run.run_dir / "_configs" / f"{step}-{config.step_hash(step)[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dump_config(config).encode())
    return path


def entrypoint(config: InfuConfig, step: str, config_file: Path, local: bool) -> str:
    python = config.run.python or (sys.executable if local else "python")
    return shlex.join([python, *get_step(step).job_arguments(), "--config", str(config_file)])


def job_resources(config: InfuConfig, step: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step's ``resources.job`` as ``submit_job``'s ``entrypoint_*`` arguments (only those set), and
    its runtime env."""
    job = config.step(step).resources.job
    arguments = {
        "entrypoint_num_cpus": job.num_cpus,
        "entrypoint_num_gpus": job.num_gpus,
        "entrypoint_memory": int(job.memory_gb * 2**30),
        "entrypoint_resources": job.resources,
    }
    return {name: value for name, value in arguments.items() if value}, job.runtime_env


def submission_prefix(config: InfuConfig, step: str) -> str:
    """``infu-<run>-<step>-<identity>-<output location>``: attempts append ``-<n>``."""
    return f"infu-{config.run.name}-{step}-{config.step_hash(step)[:12]}-{output_tag(config.step_dir(step))}"


@contextmanager
def ray_cluster(config: InfuConfig) -> Iterator[tuple[str, bool]]:
    """The job API address to use (a configured one must answer within seconds), and whether it is a
    local Ray this process started."""
    if config.run.ray_address:
        probe_address(config.run.ray_address)
        yield config.run.ray_address, False
        return
    with LocalRay() as local:
        yield local.dashboard_url, True


def run_step(
    config: InfuConfig, step: str, address: str, local: bool, log: Callable[[str], None] = print
) -> bool:
    """Run ``step`` as a Ray job on ``address`` unless its output is complete; True when a job ran."""
    config.step(step)
    if completed_manifest(config, step) is not None:
        log(f"{step}: {config.step_dir(step)} is complete for this config; skipping it")
        return False
    config_file = effective_config_file(config, step)
    resources, runtime_env = job_resources(config, step)
    run_job(
        address,
        entrypoint(config, step, config_file, local),
        submission_prefix(config, step),
        runtime_env=runtime_env,
        entrypoint_resources=resources,
        timeout_s=config.run.job_timeout_s,
        log=log,
    )
    return True
