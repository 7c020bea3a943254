"""Paths: the config path type, files that installed packages ship, and atomic writes.

Relative config paths resolve against the directory the config is loaded in. Jobs receive the
effective (fully resolved) config, so a path means the same on every Ray worker whatever its working
directory.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

ResolvedPath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]


def package_file(package: str, *parts: str) -> Path:
    """A file or folder shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed; {'/'.join(parts) or 'it'} is needed")
    return Path(spec.submodule_search_locations[0], *parts)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once or not at all: a synced temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
