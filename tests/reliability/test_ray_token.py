"""Processes that start local Rays at once on a fresh machine share one auth token."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from ..conftest import PROJECT_ROOT

CREATE = (
    "from infu.raycluster import RAY_TOKEN_FILE, ensure_ray_token; "
    "ensure_ray_token(); print(RAY_TOKEN_FILE.read_text())"
)


def test_concurrent_processes_create_one_token(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    tokens = {process.communicate(timeout=120)[0].strip() for process in processes}
    token_file = Path(tmp_path) / ".ray" / "auth_token"
    assert tokens == {token_file.read_text()} and len(token_file.read_text()) == 64
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in token_file.parent.iterdir()) == ["auth_token"]  # no drafts left
