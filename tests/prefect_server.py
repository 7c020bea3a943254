"""A real Prefect server, a process work pool and worker on loopback, with this checkout's deployments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infu.raycluster import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stop(process: subprocess.Popen) -> None:
    """SIGINT (Prefect workers hang on SIGTERM), then make sure."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class PrefectServer:
    """A running server (``api``) with the ``infu`` pool, ``prefect deploy --all`` done and a worker."""

    api: str
    env: dict[str, str]
    logs: Path

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``prefect ARGS`` against this server, from the checkout."""
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run_deployment(self, name: str, **parameters: Any) -> tuple[str, str]:
        """``prefect deployment run NAME --watch`` with ``parameters``; returns (flow run id, output)."""
        params = [
            arg for key, value in parameters.items() for arg in ("--param", f"{key}={json.dumps(value)}")
        ]
        result = self.prefect("deployment", "run", name, "--watch", *params, timeout=1800)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:] + (self.logs / "worker.log").read_text()[-5000:]
        return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1), output


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


@contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """Start the server, create the pool, deploy ``prefect.yaml`` and start a worker, as the README says."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "INFU_ROOT": str(PROJECT_ROOT),
    }
    logs = home / "logs"
    logs.mkdir(parents=True)

    def spawn(name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "prefect"), *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=open(logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )

    server = spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
    worker = None
    try:
        wait_healthy(api)
        running = PrefectServer(api, env, logs)
        created = running.prefect("work-pool", "create", "infu", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = running.prefect("deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        worker = spawn("worker", "worker", "start", "--pool", "infu")
        yield running
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
