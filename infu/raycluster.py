"""Connecting to Ray and running a step as a Ray job.

Embedded mode starts a local Ray (with its dashboard, which serves the job API) in the calling
process, listening on 127.0.0.1 only and requiring Ray's auth token (:func:`start_local_ray`); with a
cluster address, jobs go through Ray's ``JobSubmissionClient``. Either way a step runs as ``python -m
<package> <step> ...`` submitted as a job whose logs are streamed back; an attempt still running is
followed rather than started again.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
LOOPBACK = "127.0.0.1"
LOOPBACK_ADDRESSES = frozenset({LOOPBACK, "::1", "localhost"})
_SINGLE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch: one machine, node IP 127.0.0.1

log = logging.getLogger(__name__)


class JobFailedError(RuntimeError):
    """A step's Ray job ended in FAILED or STOPPED, or timed out."""


class RayUnreachableError(ConnectionError):
    """A Ray dashboard address that does not answer."""


def ensure_ray_token() -> None:
    """Create Ray's auth token (``~/.ray/auth_token``, 256 random bits, mode 0600) unless it exists, in
    one atomic step: two processes starting local Rays at once then share one token, where Ray would
    write one each and the loser's clients would be refused."""
    if RAY_TOKEN_FILE.exists():
        return
    RAY_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd, draft = tempfile.mkstemp(dir=RAY_TOKEN_FILE.parent, prefix=".auth_token.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        os.link(draft, RAY_TOKEN_FILE)
    except FileExistsError:
        pass  # another process made it first: use that one
    finally:
        os.unlink(draft)


def use_token_auth_if_present() -> None:
    """Clients of a token-auth Ray cluster must say so; Ray reads the mode once, when imported."""
    if "ray" not in sys.modules and RAY_TOKEN_FILE.exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


use_token_auth_if_present()


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray once per process: ``address``, a job's cluster (``RAY_ADDRESS``), or else a new
    local Ray (:func:`start_local_ray`), never a cluster another process happens to run on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        start_local_ray(include_dashboard=False, log_to_driver=True)


def start_local_ray(**options: Any) -> Any:
    """Start a new Ray on this machine that listens on 127.0.0.1 only and requires Ray's auth token;
    returns ``ray.init``'s context. ``options`` go to ``ray.init``.

    Ray binds its servers (GCS, raylet, workers, object manager, agents, metrics) to the node's IP, and
    to every interface too unless that IP is loopback; ``ray.init`` swaps a loopback node IP for the
    host's address unless Ray runs single-machine (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, its default
    on macOS and Windows), which Ray reads once, when imported. So this sets it for this process (and
    for a Ray imported already) and for the Ray processes it starts, which inherit the environment; a
    node that came up on another address anyway is shut down (fail closed). To serve other machines,
    start a cluster yourself (``ray start``) and set ``run.ray_address``.

    Token auth: ``RAY_AUTH_MODE=token`` (the token is created when missing, :func:`ensure_ray_token`)
    unless the environment sets the mode; ``disabled`` there is honoured with a warning.
    """
    os.environ[_SINGLE_MACHINE_RAY] = "0"
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        ensure_ray_token()
    # A Ray imported already read the mode then; left unset, ray.init of the Ray installed here turns
    # token auth on itself for a new local Ray. The warning below says when it is off.
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # what the variable above sets, for a Ray imported earlier
    _dashboard_agent_on_a_free_port()
    context = ray.init(address="local", configure_logging=False, **options)
    node_ip = context.address_info["node_ip_address"]
    if node_ip not in LOOPBACK_ADDRESSES:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on loopback; it was shut down")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        log.warning(
            "the local Ray runs without token auth (RAY_AUTH_MODE=%s): any local user can submit jobs to it",
            os.environ.get("RAY_AUTH_MODE"),
        )
    return context


def _dashboard_agent_on_a_free_port() -> None:
    """Let the dashboard agent of a Ray this process starts listen on a free port.

    The agent serves the job API's work on its node. Its HTTP port is 52365 unless the node is told
    otherwise, which ``ray.init`` cannot do: a second local Ray on the machine (another ``infu`` command,
    another user's) would find the port taken and refuse jobs. Port 0 makes the agent take a free port
    and publish it, which is where the job API looks; this sets that default of Ray's node parameters."""
    from ray._private.parameter import RayParams

    init = RayParams.__init__
    with_defaults = [
        name
        for name, parameter in inspect.signature(init).parameters.items()
        if parameter.default is not inspect.Parameter.empty
        and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    defaults = list(init.__defaults__ or ())
    if "dashboard_agent_listen_port" not in with_defaults or len(defaults) != len(with_defaults):
        log.warning("this Ray's node parameters changed: its dashboard agent keeps its default port")
        return
    defaults[with_defaults.index("dashboard_agent_listen_port")] = 0
    init.__defaults__ = tuple(defaults)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalRay:
    """A local Ray head with its dashboard, owned by this process (the embedded flow's cluster)."""

    dashboard_url: str = ""
    temp_dir: str = ""

    def start(self) -> str:
        # Its own temp dir, holding its own address: Ray's job supervisor gives its jobs the cluster named
        # by the temp dir's ``ray_current_cluster`` file. ``ray.init`` does not write that file (``ray
        # start`` does), and without it the supervisor takes any Ray running on this machine (seen: a
        # benchmark's Ray got the embedded flow's jobs).
        self.temp_dir = tempfile.mkdtemp(prefix="infu-ray-", dir="/tmp")  # short: socket paths live in it
        context = start_local_ray(
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            dashboard_port=free_port(),
            _temp_dir=self.temp_dir,
        )
        from ray._private.utils import write_ray_address  # after start_local_ray: it sets up Ray's import

        write_ray_address(context.address_info["gcs_address"], self.temp_dir)
        self.dashboard_url = f"http://{context.dashboard_url}"
        return self.dashboard_url

    def stop(self) -> None:
        import ray

        ray.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`RayUnreachableError` within about ``timeout_s`` unless a Ray dashboard answers at
    ``address`` (its version, or Ray's token-auth refusal); schemes other than HTTP are left to Ray."""
    from infu.config import redact_secrets

    url = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    if url.scheme not in ("http", "https"):
        return
    request = urllib.request.Request(
        url._replace(netloc=url.netloc.rpartition("@")[2], path="/api/version", query="").geturl()
    )
    if url.username is not None:
        credentials = f"{urllib.parse.unquote(url.username)}:{urllib.parse.unquote(url.password or '')}"
        request.add_header("Authorization", f"Basic {base64.b64encode(credentials.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
        if isinstance(answer, dict) and "ray_version" in answer:
            return
        problem = "the answer is not a Ray version"
    except urllib.error.HTTPError as error:
        if error.code == 401:  # Ray with token auth: reachable, the job client sends the token
            return
        problem = f"HTTP {error.code}, not a Ray dashboard"
    except (OSError, ValueError) as error:  # refused, unknown host, timeout, bad URL or JSON
        problem = str(getattr(error, "reason", error))
    raise RayUnreachableError(f"no Ray dashboard at run.ray_address {redact_secrets(address)}: {problem}")


def _client(address: str, attempts: int = 30):  # noqa: ANN202 - JobSubmissionClient, imported lazily
    """A job client; a freshly started dashboard may need a few seconds before it answers."""
    from ray.job_submission import JobSubmissionClient

    for attempt in range(attempts):
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError):
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def _follow_logs(client, submission_id: str, log: Callable[[str], None], timeout_s: float) -> None:  # noqa: ANN001
    """Stream the job's log lines to ``log`` until it ends (Ray's log tail: constant work per new line).

    Raises ``TimeoutError`` after ``timeout_s``; a broken log stream is reported and the job is then
    followed by its status alone.
    """

    async def tail() -> None:
        pending = ""
        try:
            async for chunk in client.tail_job_logs(submission_id):
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    log(line)
        finally:
            if pending:
                log(pending)

    async def follow() -> None:
        try:
            await asyncio.wait_for(tail(), timeout_s)
        except RuntimeError as error:
            log(f"(the log stream of job {submission_id} broke: {error}; following its status)")

    # A thread of its own: the caller may already run an event loop (Prefect tasks can).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, follow()).result()


def run_job(
    address: str,
    entrypoint: str,
    submission_prefix: str,
    *,
    runtime_env: dict | None = None,
    entrypoint_resources: dict[str, Any] | None = None,
    timeout_s: float = 6 * 3600,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> str:
    """Submit the job, or re-attach to an attempt still running, and follow it to the end with its logs.

    The submission id is ``<submission_prefix>-<attempt>``. Whether the work needs doing at all is the
    caller's question (a step's output manifest answers it); this always runs it once more, unless an
    attempt is still running. ``entrypoint_resources`` are ``submit_job``'s ``entrypoint_*`` arguments.
    Returns the id of the job that succeeded; raises :class:`JobFailedError`.
    """
    from ray.job_submission import JobStatus

    client = _client(address)
    attempts = sorted(
        (job for job in client.list_jobs() if (job.submission_id or "").startswith(f"{submission_prefix}-")),
        key=lambda job: job.start_time or 0,
    )
    latest = attempts[-1] if attempts else None
    if latest and not latest.status.is_terminal():
        submission_id = latest.submission_id
        log(f"following job {submission_id}, already {latest.status}")
    else:
        submission_id = f"{submission_prefix}-{len(attempts) + 1}"
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env or {},
            **(entrypoint_resources or {}),
        )
        reserved = ", ".join(f"{name}={value}" for name, value in (entrypoint_resources or {}).items())
        log(f"submitted job {submission_id}{f' ({reserved})' if reserved else ''}: {entrypoint}")
    deadline = time.monotonic() + timeout_s
    try:
        _follow_logs(client, submission_id, log, timeout_s)
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(poll_s)
    except TimeoutError:
        client.stop_job(submission_id)
        raise JobFailedError(
            f"job {submission_id} did not finish within {timeout_s:.0f} s; stopped it"
        ) from None
    if status != JobStatus.SUCCEEDED:
        message = client.get_job_info(submission_id).message
        raise JobFailedError(f"job {submission_id} ended {status}: {message}")
    return submission_id
