"""Shared fixtures: the real photos in ../shared (skipped when absent) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infu.raycluster import use_token_auth_if_present

use_token_auth_if_present()  # before any test imports Ray, which reads its auth mode once

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROOT = Path(os.environ.get("INFU_SHARED_DIR", PROJECT_ROOT.parent / "shared"))


def _shared(sub: str) -> Path:
    path = SHARED_ROOT / sub
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real test photos/models are read from ../shared, never copied here")
    return path


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray for one test module (any earlier connection is dropped first)."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
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
