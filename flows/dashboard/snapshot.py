"""The per-run snapshot: ``<run_dir>/dashboard/index.html``, one self-contained file (plotly.js inline,
thumbnails as ``data:`` URIs) that opens from ``file://`` without a network."""

from __future__ import annotations

from pathlib import Path

from plotly.offline import get_plotlyjs

from flows.dashboard.data import RunData
from flows.dashboard.page import closing_sections, document, snapshot_thumbnails, summary_sections
from infu.paths import write_atomic

DASHBOARD_DIR = "dashboard"
THUMBNAILS_PER_OUTCOME = 8
"""Thumbnails embedded per step and outcome (kept, each reject reason)."""


def render_snapshot(run_dir: Path) -> str:
    """The snapshot page of the run as it is now."""
    data = RunData(run_dir)
    body = [
        *summary_sections(data),
        snapshot_thumbnails(data, THUMBNAILS_PER_OUTCOME),
        *closing_sections(data),
    ]
    return document(data.run_dir, f'<script type="text/javascript">{get_plotlyjs()}</script>', body)


def snapshot_path(run_dir: Path) -> Path:
    """Where the run's snapshot is: ``<run_dir>/dashboard/index.html``."""
    return Path(run_dir) / DASHBOARD_DIR / "index.html"


def write_snapshot(run_dir: Path) -> Path:
    """Write the run's snapshot (:func:`snapshot_path`) atomically and return its path."""
    path = snapshot_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_snapshot(Path(run_dir)).encode())
    return path
