"""`make lint` keeps the three floors: a planted cross-floor import breaks an import contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    settings = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    for package in settings["tool"]["importlinter"]["root_packages"]:
        shutil.copytree(
            PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_its_contracts(tree_copy):
    result = lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("infu/uses_a_step.py", "import filtering.ingest\n", "infu (the core) imports no step package"),
        ("flows/uses_a_step.py", "from filtering.filter import decide\n", "flows import no step package"),
        ("captioning/uses_a_step.py", "import filtering.ingest\n", "step packages never import each other"),
    ],
)
def test_a_planted_cross_floor_import_fails_the_lint(tree_copy, module, planted, broken):
    (tree_copy / module).write_text(planted)
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
