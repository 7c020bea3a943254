"""Shared fixtures: the real photos in ../shared (skipped when absent) and small helpers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from infu.raycluster import ensure_ray_token, use_token_auth_if_present
from infu.shards import committed_shards
from infu.steps import get_step

from .prefect_server import PROJECT_ROOT, PrefectServer, prefect_server

# One token for every Ray the tests start, also when pytest-xdist workers start theirs at once; then
# token auth for this process, before any test imports Ray, which reads its auth mode once.
ensure_ray_token()
use_token_auth_if_present()
# Prefect's local state (its temporary servers' database) per test session, not the developer's.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="infu-tests-prefect-"))

EMBEDDED = PROJECT_ROOT / "configs" / "embedded.yaml"
"""The embedded profile's config, which most tests run."""
INFINITE_ID_EMBEDDED = PROJECT_ROOT / "configs" / "infinite-id-embedded.yaml"
"""The embedded profile with model.family infinite_id (tiny SDXL, dlib face stack)."""
SHARED_ROOT = Path(os.environ.get("INFU_SHARED_DIR", PROJECT_ROOT.parent / "shared"))


def _shared(sub: str) -> Path:
    path = SHARED_ROOT / sub
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real test photos/models are read from ../shared, never copied here")
    return path


def kill_job_midway(
    command: list[str], shards_dir: Path, after: int, count: Callable[[Path], int] | None = None
) -> int:
    """Run ``command`` (a job with its own local Ray) and SIGKILL its whole session once ``after`` shards
    are committed in ``shards_dir`` (or ``count(shards_dir)`` reaches ``after``); returns the count then.

    The session, not the process group: Ray workers lead process groups of their own, and one that
    outlived the kill could still commit a shard after the count."""
    job = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    count = count or (lambda folder: len(committed_shards(folder)))
    deadline = time.monotonic() + 300
    while count(shards_dir) < after and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    _kill_session(job.pid)
    job.wait(timeout=30)
    return count(shards_dir)


def _kill_session(session_id: int) -> None:
    """SIGKILL every process of a session and wait until none is left."""
    members = [process for process in psutil.process_iter() if _session_of(process) == session_id]
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(members, timeout=30)


def _session_of(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def kill_step_job_midway(
    step: str,
    config: Path,
    overrides: list[str],
    shards_dir: Path,
    after: int,
    count: Callable[[Path], int] | None = None,
) -> int:
    """:func:`kill_job_midway` for ``python -m <package> <command> --config ... --set ...``."""
    command = [sys.executable, *get_step(step).job_arguments(), "--config", str(config)]
    for override in overrides:
        command += ["--set", override]
    return kill_job_midway(command, shards_dir, after, count)


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray for one test module, started as the project starts it (loopback, token
    auth; never another process's cluster); any earlier connection is dropped first."""
    import ray

    from infu.raycluster import start_local_ray

    ray.shutdown()
    start_local_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


CORPUS_SHARD_SIZE = 3
"""The sample corpus in six shards: enough to kill a job between two of them."""


def corpus_overrides(run_dir: Path) -> list[str]:
    """A run in ``run_dir`` over the sample corpus (built there) in shards of :data:`CORPUS_SHARD_SIZE`."""
    return [
        f"run.run_dir={run_dir}",
        f"ingest.source.path={run_dir / 'corpus'}",
        f"ingest.shard_size={CORPUS_SHARD_SIZE}",
    ]


@pytest.fixture(scope="session")
def filtered_corpus(tmp_path_factory):
    """The sample corpus ingested and filtered once per test session (with a local Ray of its own when
    none is running): ``(config, filter manifest)``. Tests copy what they change."""
    from filtering.filter import run_filter
    from filtering.ingest import run_ingest
    from infu.config import load_config

    config = load_config(EMBEDDED, corpus_overrides(tmp_path_factory.mktemp("filtered_corpus")))
    with ray_unless_running():
        run_ingest(config)
        manifest = run_filter(config)
    return config, manifest


@pytest.fixture(scope="session")
def captioned_corpus(filtered_corpus):
    """:func:`filtered_corpus` captioned once per session: ``(config, caption manifest)``."""
    from captioning.caption import run_caption

    config, _ = filtered_corpus
    with ray_unless_running():
        return config, run_caption(config)


@contextlib.contextmanager
def ray_unless_running() -> Iterator[None]:
    """A local Ray of its own for the block when none is connected."""
    import ray

    from infu.raycluster import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """../shared/data/faces: real photos with known face outcomes (see its README)."""
    return _shared("data/faces")


@pytest.fixture(scope="session")
def shared_portraits() -> Path:
    return _shared("data/portraits")


@pytest.fixture(scope="session")
def shared_models() -> Path:
    return _shared("models")


@pytest.fixture(scope="session")
def shared_specs() -> Path:
    return _shared("specs")


def training_losses(run_dir: Path, step: str = "stage1") -> dict[int, float]:
    """Step -> loss of a training step's ``metrics.jsonl`` in ``run_dir``."""
    lines = (run_dir / step / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def assert_trains_as(config, reference_run: Path) -> None:
    """Run ``config``'s stage 1 and check each of its losses equals ``reference_run``'s at that step."""
    from training.train import run_training

    with ray_unless_running():
        run_training(config, "stage1")
    reference, losses = training_losses(reference_run), training_losses(config.run.run_dir)
    assert sorted(losses) == list(range(1, config.stage1.steps + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def copy_step_outputs(source: Path, dest: Path, steps: tuple[str, ...]) -> None:
    """Copy the outputs of ``steps`` (and the sample corpus) of run folder ``source`` into ``dest``."""
    for step in ("corpus", *steps):
        shutil.copytree(source / step, dest / step)


@pytest.fixture(scope="session")
def spms_pairs(captioned_corpus, tmp_path_factory):
    """The captioned corpus, a 2-step stage-1 export, its synthesis and the SPMS filter, once per session
    in a run folder of their own: ``(config, synth manifest, spms manifest)``."""
    from datagen.spms_filter import run_spms
    from datagen.synth import run_synth
    from infu.config import load_config
    from training.train import run_training

    source, _ = captioned_corpus
    run_dir = tmp_path_factory.mktemp("spms_pairs")
    copy_step_outputs(source.run.run_dir, run_dir, ("ingest", "filter", "caption"))
    config = load_config(EMBEDDED, spms_overrides(run_dir))
    with ray_unless_running():
        run_training(config, "stage1")
        return config, run_synth(config), run_spms(config)


def spms_overrides(run_dir: Path) -> list[str]:
    """A run in ``run_dir`` (holding the sample corpus) with a 2-step stage 1 and its pose photos."""
    return [
        *corpus_overrides(run_dir),
        "stage1.steps=2",
        "stage1.validation.every=null",
        "stage1.checkpoint.every=2",
        f"synth.pose_photos={run_dir / 'corpus' / 'people'}",
    ]


@dataclass(frozen=True)
class PipelineRun:
    """A complete embedded run of ``full-pipeline``, through its Prefect deployment."""

    run_dir: Path
    server: PrefectServer | None
    """The Prefect server it ran on, still up for the session (None for a reused run folder)."""
    flow_run_id: str | None
    output: str


def pipeline_overrides(run_dir: Path) -> list[str]:
    """The whole pipeline in ``run_dir`` on the sample corpus (built there), with short training."""
    corpus = run_dir / "sample_corpus"
    return [
        f"run.run_dir={run_dir}",
        f"ingest.source.path={corpus}",
        f"synth.pose_photos={corpus / 'people'}",
        f"benchmark.identities={corpus}",
        "stage1.steps=4",
        "stage1.checkpoint.every=2",
        "synth.samples_per_reference=2",
        "stage2.steps=2",
        "stage2.global_batch=2",
        "stage2.data.micro_batch=1",
        "stage2.validation.every=null",
        "stage2.checkpoint.every=2",
    ]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Iterator[PipelineRun]:
    """``prefect deployment run full-pipeline/embedded --watch`` on a real server and process worker, as
    the README says, once per session; the server stays up for the tests that query it.

    ``INFU_PIPELINE_RUN=<run folder>`` reuses a finished run folder instead (while working on the
    dashboard, say); the tests of the deployment itself then skip."""
    reused = os.environ.get("INFU_PIPELINE_RUN")
    if reused:
        yield PipelineRun(Path(reused), None, None, "")
        return
    import ray

    ray.shutdown()  # the flow starts a local Ray of its own
    run_dir = tmp_path_factory.mktemp("pipeline_run")
    with prefect_server(tmp_path_factory.mktemp("prefect")) as server:
        flow_run_id, output = server.run_deployment(
            "full-pipeline/embedded", overrides=pipeline_overrides(run_dir)
        )
        yield PipelineRun(run_dir, server, flow_run_id, output)
