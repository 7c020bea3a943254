"""Connecting to Ray and running a step as a Ray job.

Embedded mode starts a local Ray (with its dashboard, which serves the job API) in the calling
process; with a cluster address, jobs go through Ray's ``JobSubmissionClient``. Either way a step
runs as ``python -m <package> <step> ...`` submitted as a job whose logs are streamed back; an attempt
still running is followed rather than started again.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class JobFailedError(RuntimeError):
    """A step's Ray job ended in FAILED or STOPPED, or timed out."""


def use_token_auth_if_present() -> None:
    """Clients of a token-auth Ray cluster must say so; Ray reads the mode once, when imported."""
    if "ray" not in sys.modules and RAY_TOKEN_FILE.exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


use_token_auth_if_present()


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray once per process: a job's cluster (``RAY_ADDRESS``), ``address``, or a new local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalRay:
    """A local Ray head with its dashboard, owned by this process (the embedded flow's cluster)."""

    dashboard_url: str = ""

    def start(self) -> str:
        import ray

        port = free_port()
        context = ray.init(
            include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, configure_logging=False
        )
        self.dashboard_url = f"http://{context.dashboard_url}"
        return self.dashboard_url

    def stop(self) -> None:
        import ray

        ray.shutdown()

    def __enter__(self) -> LocalRay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    timeout_s: float = 6 * 3600,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> str:
    """Submit the job, or re-attach to an attempt still running, and follow it to the end with its logs.

    The submission id is ``<submission_prefix>-<attempt>``. Whether the work needs doing at all is the
    caller's question (a step's output manifest answers it); this always runs it once more, unless an
    attempt is still running. Returns the id of the job that succeeded; raises :class:`JobFailedError`.
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
        client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env or {})
        log(f"submitted job {submission_id}: {entrypoint}")
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
