"""Inputs shared by the benchmarks (run as ``python bench/<name>.py``: this folder is on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

from infu.sample_corpus import build_sample_corpus


def corpus_copies(folder: Path, copies: int) -> Path:
    """The sample corpus's images that pass ingest, ``copies`` times under distinct names."""
    labels = build_sample_corpus(folder / "base")
    images = folder / "images"
    images.mkdir()
    for label in labels:
        if label.expect_ingest == "ok":
            for copy in range(copies):
                shutil.copy(folder / "base" / label.path, images / f"{copy}_{Path(label.path).name}")
    return images
