"""`prefect deployment run full-pipeline/embedded` through a real Prefect server and process worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from infu.index import DatasetIndex
from infu.raycluster import free_port

from .test_flow import BIN, PROJECT_ROOT

pytestmark = pytest.mark.slow


def wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} did not become healthy")


def stop(process: subprocess.Popen) -> None:
    """SIGINT (Prefect workers hang on SIGTERM), then make sure."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_deployment_runs_the_flow_on_a_process_worker(tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "INFU_ROOT": str(PROJECT_ROOT),
    }
    port = api.split(":")[2].split("/")[0]
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "prefect"), *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=open(logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )

    def prefect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    server = spawn("server", "server", "start", "--host", "127.0.0.1", "--port", port)
    worker = None
    try:
        wait_healthy(api)
        assert prefect("work-pool", "create", "infu", "--type", "process").returncode == 0
        deployed = prefect("deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        worker = spawn("worker", "worker", "start", "--pool", "infu")
        run_dir = tmp_path / "run"
        overrides = [f"run.run_dir={run_dir}", f"ingest.source.path={run_dir / 'sample_corpus'}"]
        result = prefect(
            "deployment",
            "run",
            "full-pipeline/embedded",
            "--watch",
            "--param",
            f"overrides={json.dumps(overrides)}",
            "--param",
            'steps=["ingest"]',  # the deployment path is what is tested; test_flow runs every step
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:] + (logs / "worker.log").read_text()[-3000:]
        assert "Flow run finished successfully in 'Completed'" in output
        assert DatasetIndex(run_dir / "ingest").count() == 18
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
