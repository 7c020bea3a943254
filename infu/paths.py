"""Path type for configs: relative paths resolve against the directory the config is loaded in.

Jobs receive the effective (fully resolved) config, so a path means the same on every Ray worker
whatever its working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

ResolvedPath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]
