"""End to end: the Prefect flow runs ingest as a Ray job; `ray job submit` works on a `ray start` cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import ray

from flows.steps import job_resources
from infu.captions import read_captions
from infu.config import load_config
from infu.index import DatasetIndex
from infu.lineage import completed_manifest
from infu.manifest import read_manifest
from infu.progress import latest_progress, percent, write_progress
from infu.raycluster import JobFailedError, LocalRay, free_port, run_job
from infu.sample_corpus import build_sample_corpus, read_labels
from infu.steps import StepError, get_step, pipeline_order, select_steps

from .conftest import EMBEDDED, pipeline_overrides
from .prefect_server import BIN, PROJECT_ROOT

EXPECTED_OUTCOMES = {"ok": 14, "bad_image": 1, "not_image": 1, "too_large": 1, "too_small": 1}
FILTERED_OUTCOMES = {
    "ok": 10,
    "bad_image": 1,
    "not_image": 1,
    "too_large": 1,
    "too_small": 1,
    "face_too_small": 1,
    "multiple_faces": 1,
    "watermark": 1,
    "no_face": 1,
}


def run(command: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=environment
    )


def in_run_dir(run_dir: Path) -> list[str]:
    """Overrides that keep every output (and the sample corpus) under ``run_dir``."""
    corpus = run_dir / "sample_corpus"
    return ["--set", f"run.run_dir={run_dir}", "--set", f"ingest.source.path={corpus}"] + [
        "--set",
        f"synth.pose_photos={corpus / 'people'}",
        "--set",
        f"benchmark.identities={corpus}",
    ]


def assert_ingested(run_dir: Path) -> None:
    index = DatasetIndex(run_dir / "ingest")
    assert index.reason_counts() == EXPECTED_OUTCOMES
    labels = {label.path: label.expect_ingest for label in read_labels(run_dir / "sample_corpus")}
    rows = index.query("SELECT source_path, coalesce(reject_reason, status) AS outcome FROM samples")
    assert {row["source_path"]: row["outcome"] for row in rows} == labels


def assert_filtered(run_dir: Path) -> None:
    assert DatasetIndex(run_dir / "filter").reason_counts() == FILTERED_OUTCOMES


def assert_captioned(run_dir: Path, kept: int = FILTERED_OUTCOMES["ok"]) -> None:
    rows = read_captions(run_dir / "caption")
    assert len(rows) == kept and all(row["attribute"] for row in rows.values())


def assert_trained(run_dir: Path, steps: int, step: str = "stage1") -> None:
    manifest = json.loads((run_dir / step / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == steps
    assert (Path(manifest["export"]) / "infu_flux_v1.0" / "aes_stage2" / "InfuseNetModel").is_dir()


def assert_evaluated(run_dir: Path) -> None:
    """Both trained models made and scored the benchmark's 21 embedded pairs; the report is there."""
    summary = json.loads((run_dir / "eval" / "report" / "summary.json").read_text())
    assert {model: numbers["images"] for model, numbers in summary["models"].items()} == {
        "stage1": 21,
        "stage2": 21,
    }
    assert (run_dir / "eval" / "report" / "report.html").is_file()


def assert_paired(run_dir: Path) -> None:
    """Two synthesis rows per kept portrait, every one decided by the SPMS filter; stage 2 trained on them."""
    synth, spms = (json.loads((run_dir / step / "_manifest.json").read_text()) for step in ("synth", "spms"))
    assert synth["status"] == spms["status"] == "complete"
    assert synth["counts"]["samples"] == spms["counts"]["samples"] == 20
    assert_trained(run_dir, steps=2, step="stage2")


def test_a_rerun_skips_every_step_and_a_changed_threshold_reruns_from_the_filter(pipeline_run, tmp_path):
    """`infu run` on a copy of the finished run (a moved run folder is still complete): unchanged, it
    runs nothing; with a stricter face-size threshold it reruns the filter and every step after it,
    never the ingest."""
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run_dir, symlinks=True)
    overrides = pipeline_overrides(run_dir)
    command = [str(BIN / "infu"), "run", "--config", str(EMBEDDED)]
    command += [argument for override in overrides for argument in ("--set", override)]
    result = run(command)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "all complete, nothing to run" in output
    assert output.count("complete already, skipped") == len(pipeline_order())
    assert f"dashboard: {run_dir / 'dashboard' / 'index.html'}" in result.stdout
    result = run([*command, "--start-from", "caption", "--stop-after", "stage1"])
    assert "steps caption, precompute, stage1; all complete" in result.stdout + result.stderr
    written = {step: read_manifest(run_dir / step)["written_at"] for step in pipeline_order()}

    # The filter's first job fails (its interpreter, run.python, exits 3 once): the task retry reruns it.
    python = tmp_path / "python-failing-once"
    python.write_text(
        f'#!/bin/sh\necho "job env: $INFU_PROBE"\n'
        f"if [ ! -e {tmp_path}/failed ]; then touch {tmp_path}/failed; exit 3; fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    execution = [f"run.python={python}", "run.job_retries=1", "run.retry_delay_s=0"]
    execution += [
        "filter.resources.job.memory_gb=0.5",  # not CPUs: the filter's workers take both of this Ray's
        'filter.resources.job.runtime_env={"env_vars": {"INFU_PROBE": "set"}}',
    ]
    stricter = "filter.thresholds.min_face_px=200"
    settings = [argument for override in (*execution, stricter) for argument in ("--set", override)]
    result = run([*command, *settings])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    downstream = pipeline_order()[pipeline_order().index("filter") :]
    assert "to run on Ray at" in output and f": {', '.join(downstream)}" in output
    filter_jobs = re.findall(
        r"submitted job (infu-embedded-filter-\S+) \(entrypoint_memory=536870912\)", output
    )
    assert [job.rsplit("-", 1)[1] for job in filter_jobs] == ["1", "2"], "retried once as a new attempt"
    assert "job env: set" in output, "the step's runtime env reached its job"
    assert read_manifest(run_dir / "ingest")["written_at"] == written["ingest"]
    config = load_config(EMBEDDED, [*overrides, stricter])
    for step in downstream:
        assert completed_manifest(config, step)["written_at"] > written[step], step
    kept = DatasetIndex(run_dir / "filter").reason_counts()["ok"]
    assert kept < FILTERED_OUTCOMES["ok"]
    assert_captioned(run_dir, kept=kept)
    assert (run_dir / "_superseded").is_dir(), "the old outputs were moved aside, not deleted"


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster on free ports (its dashboard agent's too) with its own temp dir,
    stopped afterwards: only its own processes (`ray stop` would stop every Ray on the machine, a
    developer's included)."""
    ray.shutdown()
    dashboard, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths live in it
    started = run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-agent-listen-port=0",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
        ],
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    yield f"http://127.0.0.1:{dashboard}"
    # The client server names only the GCS address: its port, not a longer number starting with it.
    stop_processes_mentioning(re.escape(temp_dir), rf":{gcs}(?!\d)")
    shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_mentioning(*patterns: str) -> None:
    """SIGTERM (then SIGKILL) the processes whose command line matches one of the regular expressions
    ``patterns``, and their descendants (Ray workers retitle themselves ``ray::...``, but are children of
    the raylet)."""
    roots = [
        process
        for process in psutil.process_iter(["cmdline"])
        if process.pid != os.getpid()
        and any(re.search(pattern, " ".join(process.info["cmdline"] or [])) for pattern in patterns)
    ]
    processes = {*roots}
    for root in roots:
        try:
            processes.update(root.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)


def submit_step(ray_head: str, step: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m <package> <step> ...`, as the README shows."""
    auth = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else {}
    entrypoint = [
        "python",
        *get_step(step).job_arguments(),
        "--config",
        str(EMBEDDED),
        *in_run_dir(run_dir),
        *overrides,
    ]
    return run([str(BIN / "ray"), "job", "submit", "--address", ray_head, "--", *entrypoint], **auth)


def small_source(folder: Path) -> list[str]:
    """Overrides reading three corpus portraits (one of them too small after a min_side change)."""
    corpus = folder / "corpus"
    build_sample_corpus(corpus)
    photos = folder / "photos"
    photos.mkdir()
    for name in ("people/person_0.jpg", "people/person_1.jpg", "variants/very_small.jpg"):
        shutil.copy(corpus / name, photos / Path(name).name)
    return ["--set", "ingest.source.kind=folder", "--set", f"ingest.source.path={photos}"]


@pytest.mark.slow
def test_the_output_folder_decides_what_runs_on_a_persistent_cluster(ray_head, tmp_path):
    """Lineage through `ray job submit` and `infu run` against one `ray start --head` cluster."""
    source = small_source(tmp_path)
    submitted = tmp_path / "submitted"
    first = submit_step(ray_head, "ingest", submitted, *source)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = submit_step(ray_head, "ingest", submitted, *source)
    assert again.returncode == 0 and "is complete for identity" in again.stdout
    for step in ("filter", "caption"):
        done = submit_step(ray_head, step, submitted, *source)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_captioned(submitted, kept=2)
    two_samples = ["stage1.steps=2", "stage1.global_batch=2", "stage1.data.micro_batch=1"]
    trained = submit_step(ray_head, "stage1", submitted, *source, *(f"--set={item}" for item in two_samples))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert_trained(submitted, steps=2)
    # Every target a pose photo, every pair kept: enough pairs for a stage-2 batch of 2.
    pairs = [*two_samples, "synth.samples_per_reference=2", "synth.photo_share=1.0"]
    pairs += [f"synth.pose_photos={tmp_path / 'photos'}", "spms.thresholds.min_identity_similarity=-1"]
    pairs += ["spms.thresholds.max_copy_paste=1", "stage2.steps=2", "stage2.global_batch=2"]
    pairs += ["stage2.data.micro_batch=1", "stage2.validation.every=null"]
    for step in ("synth", "spms", "stage2"):
        done = submit_step(ray_head, step, submitted, *source, *(f"--set={item}" for item in pairs))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    spms = json.loads((submitted / "spms" / "_manifest.json").read_text())
    assert spms["status"] == "complete" and spms["counts"]["samples"] == 4 and spms["counts"]["ok"] >= 2
    assert_trained(submitted, steps=2, step="stage2")
    for step in ("benchmark", "eval"):
        done = submit_step(ray_head, step, submitted, *source, *(f"--set={item}" for item in pairs))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_evaluated(submitted)

    def infu_run(*overrides: str) -> str:
        command = [str(BIN / "infu"), "run", "--config", str(EMBEDDED), *in_run_dir(tmp_path / "flow")]
        # Lineage of the data steps; training and synthesis are submitted above.
        for step in ("precompute", "stage1", "synth", "spms", "stage2", "benchmark", "eval"):
            command += ["--set", f"{step}=null"]
        done = run([*command, *source, "--set", f"run.ray_address={ray_head}", *overrides])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    # Another run folder on the same cluster, same config: everything runs there.
    output = infu_run()
    for step in ("ingest", "filter", "caption"):
        assert f"submitted job infu-embedded-{step}-" in output
    assert DatasetIndex(tmp_path / "flow" / "filter").reason_counts() == {"ok": 2, "too_small": 1}
    assert_captioned(tmp_path / "flow", kept=2)
    # Unchanged, or only resources changed: nothing runs.
    output = infu_run("--set", "filter.resources.concurrency=1", "--set", "ingest.resources.batch_size=2")
    assert "submitted job" not in output and output.count("is complete for this config; skipping it") == 3
    # An ingest setting changed: ingest and everything after it run again; the old outputs are kept aside.
    output = infu_run("--set", "ingest.min_side=350")
    assert "submitted job infu-embedded-ingest-" in output and "submitted job infu-embedded-filter-" in output
    assert DatasetIndex(tmp_path / "flow" / "filter").reason_counts() == {"ok": 1, "too_small": 2}
    assert_captioned(tmp_path / "flow", kept=1)
    superseded = sorted(path.name.split("-")[0] for path in (tmp_path / "flow" / "_superseded").iterdir())
    assert superseded == ["caption", "filter", "ingest"]


@pytest.mark.slow
def test_a_failed_job_fails_the_step_and_is_retried_as_a_new_attempt(ray_head):
    lines: list[str] = []
    failing = f"{sys.executable} -c \"print('about to fail'); raise SystemExit(3)\""
    for attempt in (1, 2):
        with pytest.raises(JobFailedError, match=f"job infu-test-fail-{attempt} ended FAILED"):
            run_job(ray_head, failing, "infu-test-fail", log=lines.append, poll_s=0.2, timeout_s=120)
    assert "about to fail" in lines
    assert (
        run_job(ray_head, f"{sys.executable} -c pass", "infu-test-pass", log=lines.append)
        == "infu-test-pass-1"
    )


def test_cli_reports_config_errors_and_builds_the_corpus(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  source: {kind: folder, path: x, dataset: d}\n  shard_sise: 1\n")
    result = run([str(BIN / "infu"), "config", "validate", str(bad)])
    assert result.returncode == 2 and "ingest.shard_sise: unknown key" in result.stderr
    valid = run([str(BIN / "infu"), "config", "validate", str(EMBEDDED)])
    assert valid.returncode == 0 and "ingest: identity" in valid.stdout
    corpus = run([str(BIN / "infu"), "sample-corpus", str(tmp_path / "corpus")])
    assert corpus.returncode == 0 and len(read_labels(tmp_path / "corpus")) == 18


def test_steps_are_selected_by_name_and_range_in_pipeline_order(tmp_path):
    ingest_only = tmp_path / "ingest.yaml"
    ingest_only.write_text("ingest:\n  source: {kind: folder, path: photos, dataset: d}\n")
    with pytest.raises(StepError, match="step filter has no section in this config; its steps: ingest"):
        select_steps(load_config(ingest_only), stop_after="filter")
    config = load_config(EMBEDDED)
    assert select_steps(config) == pipeline_order()
    assert select_steps(config, start_from="caption", stop_after="stage1") == [
        "caption",
        "precompute",
        "stage1",
    ]
    assert select_steps(config, only=["eval", "ingest"], stop_after="filter") == ["ingest"]
    for only, start_from, stop_after, message in [
        (["nope"], None, None, "unknown step 'nope'"),
        (None, "stage2", "filter", "start_from stage2 comes after stop_after filter"),
        (["eval"], None, "filter", "select no step"),
    ]:
        with pytest.raises(StepError, match=message):
            select_steps(config, only, start_from, stop_after)


def test_a_steps_job_reserves_its_driver_resources_and_runtime_env():
    config = load_config(EMBEDDED, ["stage1.resources.job.num_gpus=1", "stage1.resources.job.memory_gb=2"])
    assert job_resources(config, "stage1") == ({"entrypoint_num_gpus": 1, "entrypoint_memory": 2 * 2**30}, {})
    assert job_resources(config, "ingest") == ({}, {})
    assert config.step_hash("stage1") == load_config(EMBEDDED).step_hash("stage1"), (
        "resources are no identity"
    )


def test_the_newest_progress_record_of_a_step_is_the_one_shown(tmp_path):
    assert latest_progress(tmp_path) is None
    (tmp_path / "decide").mkdir()
    write_progress(tmp_path / "decide", "filter: decide", 2, 2, "shards")
    write_progress(tmp_path, "filter: write", 1, 4, "shards")
    record = latest_progress(tmp_path)
    assert (record["label"], record["done"], record["total"], percent(record)) == (
        "filter: write",
        1,
        4,
        25.0,
    )


def test_the_flows_own_ray_gives_its_jobs_its_own_address_while_another_ray_runs_here():
    """Another Ray on this machine (started without ``ray start``) must not get the flow's jobs."""
    stranger = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from infu.raycluster import start_local_ray; "
            "start_local_ray(num_cpus=1, include_dashboard=False); print('up', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        assert stranger.stdout.readline().strip() == "up"
        lines: list[str] = []
        with LocalRay() as local:
            own = ray.get_runtime_context().gcs_address
            entrypoint = f"{sys.executable} -c \"import os; print('address', os.environ['RAY_ADDRESS'])\""
            run_job(local.dashboard_url, entrypoint, "infu-test-address", log=lines.append, timeout_s=120)
        assert any(line.strip() == f"address {own}" for line in lines), lines
    finally:
        stranger.send_signal(signal.SIGINT)
        stranger.wait(timeout=60)
