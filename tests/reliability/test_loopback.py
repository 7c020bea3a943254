"""Services the project starts itself listen on loopback only, and its local Ray requires Ray's token.

Each test starts the services in a subprocess the way the project does (``flows.steps.ray_cluster`` as
``infu ingest``/``infu run`` do, ``ensure_ray`` as a step run by hand does, ``infu run`` for Prefect's
temporary server), lists the listening TCP sockets of that process tree with psutil while they run,
and from this process, which holds no token, checks that Ray refuses it. The subprocess shuts its own
Ray down (``ray.shutdown``); the test then checks that no process of the tree is left.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from infu.config import load_config
from infu.manifest import open_step_output
from infu.steps import configured_steps

from ..conftest import EMBEDDED, PROJECT_ROOT

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
MARK = "LOOPBACK-PROBE "

# The job the flow case submits: its driver connects as a step's job does and runs tasks on workers.
JOB = """
import time
import ray
from infu.raycluster import ensure_ray
ensure_ray()
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])
time.sleep(3)
"""

# `infu ingest` / `infu run`: the flow's local Ray (with its job API), one step run as a Ray job.
FLOW = f"""
import json, shlex, sys
from flows.steps import ray_cluster
from infu.config import load_config
from infu.raycluster import run_job

config = load_config({str(EMBEDDED)!r}, ["run.run_dir=" + sys.argv[1]])
with ray_cluster(config) as (address, local):
    import ray

    assert local
    run_job(address, shlex.join([sys.executable, "-c", {JOB!r}]), "loopback-probe", log=lambda line: None)
    info = {{"dashboard": address, "gcs": ray.get_runtime_context().gcs_address}}
    print({MARK!r} + json.dumps(info), flush=True)
    sys.stdin.readline()
"""

# `python -m filtering <step>` run by hand: the step's modules import Ray before the runner asks for it.
BY_HAND = f"""
import json, sys
import ray
from infu.raycluster import ensure_ray

ensure_ray()
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])
print({MARK!r} + json.dumps({{"gcs": ray.get_runtime_context().gcs_address}}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def probe_env(home: Path) -> dict[str, str]:
    """This environment without any Ray address or auth/bind setting, and a HOME without a Ray token:
    whatever the project's Ray does about them, it does by itself."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a busy 2-core machine is slow
    return env


def describe(process: psutil.Process) -> str:
    """``gcs_server``, ``raylet``, ``ray::DashboardAgent``, ``python3 dashboard.py``, ``python3 uvicorn``."""
    name, args = process.name(), process.cmdline()
    if name.startswith("python") and len(args) > 1:
        script = args[2] if args[1] in ("-m", "-u") and len(args) > 2 else args[1]
        name = f"{name} {Path(script).name}"
    return name


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its descendants."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in processes:
        try:
            name = describe(process)
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((name, connection.laddr.ip, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Probe:
    """A subprocess whose process tree is sampled for listening sockets until it exits."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.root = psutil.Process(self.process.pid)
        self.tree: dict[int, psutil.Process] = {}
        self.sockets: set[tuple[str, str, int]] = set()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def sample(self) -> None:
        self.sockets |= listening(self.root)
        try:
            self.tree.update({child.pid: child for child in self.root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass

    def wait_for_info(self, timeout_s: float) -> dict | None:
        """Sample until the subprocess prints its info line (then it waits on stdin), or exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sample()
            try:
                line = self.lines.get(timeout=0.25)
            except queue.Empty:
                if self.process.poll() is not None:
                    return None
                continue
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.kill()
        raise AssertionError(f"no answer within {timeout_s} s: {self.stderr_tail()}")

    def finish(self, timeout_s: float = 180) -> int:
        """Let the subprocess shut its Ray down and exit (sampling meanwhile); its rc."""
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"did not exit within {timeout_s} s: {self.stderr_tail()}")
            self.sample()
            time.sleep(0.25)
        self.log.close()
        return self.process.returncode

    def leftovers(self, timeout_s: float = 60) -> list[str]:
        """Processes of the tree still running ``timeout_s`` after the subprocess exited (killed then)."""
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=timeout_s)
        names = []
        for process in alive:
            try:
                names.append(f"{process.pid} {process.name()}")
                process.kill()
            except psutil.NoSuchProcess:
                continue
        return names

    def kill(self) -> None:
        self.sample()
        for process in [*self.tree.values(), self.root]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue

    def stderr_tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()[-3000:]


def not_on_loopback(sockets: set[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return sorted(entry for entry in sockets if entry[1] not in LOOPBACK)


def assert_refused_without_token(gcs_address: str, dashboard_url: str | None = None) -> None:
    """A client without the token (this process) gets nothing from the GCS or the job API."""
    import grpc

    with grpc.insecure_channel(gcs_address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    if dashboard_url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=30)
        assert refused.value.code == 401


def run_ray_probe(code: str, tmp_path: Path, *args: str) -> tuple[Probe, dict]:
    probe = Probe([sys.executable, "-c", code, *args], probe_env(tmp_path / "home"), tmp_path / "stderr")
    info = probe.wait_for_info(timeout_s=420)
    if info is None:  # it failed: end what it left running, then say why
        probe.leftovers(timeout_s=30)
    assert info is not None, f"rc {probe.process.returncode}: {probe.stderr_tail()}"
    return probe, info


@contextmanager
def ray_default_agent_port_held() -> Iterator[None]:
    """Port 52365, where Ray's dashboard agent listens by default, held for the duration (unless another
    process holds it already): as when another Ray runs on the machine."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 52365))
            sock.listen()
        except OSError:
            pass  # held by another process: the same situation
        yield


def assert_ray_ran_and_left_nothing(probe, rc: int) -> None:
    """The probe exited 0, its GCS and raylet listened, and none of its processes is left."""
    assert rc == 0, probe.stderr_tail()
    assert probe.leftovers() == []
    names = {name for name, _, _ in probe.sockets}
    assert any("gcs_server" in name for name in names) and any("raylet" in name for name in names)


def test_the_flows_local_ray_and_its_jobs_listen_on_loopback_only_and_require_the_token(tmp_path):
    """Also: its jobs run while Ray's default agent port is held (two local Rays can both serve jobs)."""
    with ray_default_agent_port_held():  # another Ray's agent on the machine does not stop its jobs
        probe, info = run_ray_probe(FLOW, tmp_path, str(tmp_path / "run"))
    try:
        assert info["dashboard"].startswith("http://127.0.0.1:")
        assert_refused_without_token(info["gcs"], info["dashboard"])
    finally:
        rc = probe.finish()
    assert_ray_ran_and_left_nothing(probe, rc)
    assert any(port == int(info["dashboard"].rsplit(":", 1)[1]) for _, _, port in probe.sockets)
    assert not_on_loopback(probe.sockets) == [], sorted(probe.sockets)


def test_a_step_run_by_hand_starts_a_local_ray_on_loopback_only_that_requires_the_token(tmp_path):
    probe, info = run_ray_probe(BY_HAND, tmp_path)
    try:
        assert info["gcs"].startswith("127.0.0.1:")
        assert_refused_without_token(info["gcs"])
    finally:
        rc = probe.finish()
    assert_ray_ran_and_left_nothing(probe, rc)
    assert not_on_loopback(probe.sockets) == [], sorted(probe.sockets)


def test_the_temporary_prefect_server_of_infu_run_listens_on_loopback_only(tmp_path):
    """Every step complete: `infu run` starts only Prefect's temporary server (no Ray)."""
    run_dir = tmp_path / "run"
    config = load_config(EMBEDDED, [f"run.run_dir={run_dir}"])
    for step in configured_steps(config):
        open_step_output(config, step, config.step(step)).complete()
    infu = Path(sys.executable).parent / "infu"
    command = [str(infu), "run", "--config", str(EMBEDDED), "--set", f"run.run_dir={run_dir}"]
    probe = Probe(command, probe_env(tmp_path / "home"), tmp_path / "stderr")
    rc = probe.finish(timeout_s=420)
    assert rc == 0, probe.stderr_tail()
    assert "all complete, nothing to run" in (tmp_path / "stderr").read_text() + "".join(probe.lines.queue)
    assert probe.leftovers() == []
    assert any("uvicorn" in name for name, _, _ in probe.sockets), sorted(probe.sockets)
    assert not_on_loopback(probe.sockets) == [], sorted(probe.sockets)
