"""Captions: the captions Parquet every caption step writes, and the mixture training samples from.

A captions folder holds shards like a step's output (see :mod:`infu.shards`): one ``NNNNNN.parquet`` per
filter shard with :data:`CAPTION_SCHEMA` (one row per kept sample, one nullable text column per source,
the flags each source's caption got), committed by its stats file.

Training draws one caption per sample and epoch with :class:`CaptionMixture`: the empty caption with
probability ``empty_rate`` (caption dropout, for classifier-free guidance), else a source by weight
among those that have text for the sample. Draws are a pure function of (seed, sample key, epoch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from infu.config import Section
from infu.draws import stable_uniform, weighted_index
from infu.shards import parquet_paths

CAPTION_SOURCES = ("original", "attribute", "small", "blip2", "internvl2")
"""Caption sources, in column order."""

CAPTION_SCHEMA_VERSION = 1

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("shard", pa.string()),
        *(pa.field(source, pa.string()) for source in CAPTION_SOURCES),
        pa.field("flags", pa.map_(pa.string(), pa.list_(pa.string()))),
    ],
    metadata={b"infu_caption_schema_version": str(CAPTION_SCHEMA_VERSION).encode()},
)
"""One row per sample: its key, dataset and filter shard, the stored caption per source (null: none or
dropped) and ``flags``: source -> the flags its caption got (see ``captioning.quality``)."""


def captions_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Caption rows -> Arrow table with :data:`CAPTION_SCHEMA`; a missing source column is null, missing
    flags are empty, an unknown column is a ``KeyError``."""
    prepared = []
    for row in rows:
        unknown = set(row) - set(CAPTION_SCHEMA.names)
        if unknown:
            raise KeyError(f"caption row {row.get('key')!r} has unknown columns {sorted(unknown)}")
        flags = row.get("flags") or {}
        prepared.append({**row, "flags": list(flags.items())})
    return pa.Table.from_pylist(prepared, schema=CAPTION_SCHEMA)


def read_caption_rows(path: Path) -> list[dict[str, Any]]:
    """The caption rows of one captions Parquet file, every column present, flags as a ``dict``."""
    rows = pq.read_table(path, schema=CAPTION_SCHEMA).to_pylist()
    for row in rows:
        row["flags"] = dict(row["flags"] or {})
    return rows


def read_captions(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Sample key -> caption row over the committed shards of a captions folder (all in memory).

    A key found in two shards is an error: its captions would be ambiguous."""
    captions: dict[str, dict[str, Any]] = {}
    for path in parquet_paths(out_dir):
        for row in read_caption_rows(path):
            if row["key"] in captions:
                raise ValueError(
                    f"{out_dir}: sample {row['key']} is in shards {captions[row['key']]['shard']} "
                    f"and {row['shard']}"
                )
            captions[row["key"]] = row
    return captions


class MixtureConfig(Section):
    """Which caption a training sample gets, per epoch."""

    weights: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(CAPTION_SOURCES, 1.0),
        description="source -> relative weight (>= 0); renormalised over the sources a sample has text for",
    )
    empty_rate: float = Field(
        0.1, ge=0, lt=1, description="share of draws that get the empty caption (classifier-free guidance)"
    )
    seed: int = Field(0, description="with the sample key and epoch, decides every draw")

    @field_validator("weights")
    @classmethod
    def _known_sources_and_some_weight(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(CAPTION_SOURCES))
        if unknown:
            raise ValueError(f"unknown caption source {unknown} (sources: {', '.join(CAPTION_SOURCES)})")
        negative = {source: weight for source, weight in weights.items() if weight < 0}
        if negative:
            raise ValueError(f"negative weight {negative}: weights must be >= 0")
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError(f"every weight is zero {weights}: at least one source needs a weight > 0")
        return weights


class CaptionMixture:
    """Draws a sample's training caption: seeded and reproducible per (seed, sample key, epoch)."""

    def __init__(self, config: MixtureConfig):
        self.config = config
        self._weights = [(source, config.weights.get(source, 0.0)) for source in CAPTION_SOURCES]

    def pick(self, key: str, epoch: int, captions: Mapping[str, str | None]) -> tuple[str | None, str]:
        """``(source, text)`` for sample ``key`` in ``epoch``; ``(None, "")`` for the empty caption
        (dropout, or no weighted source has text for this sample)."""
        seed = self.config.seed
        if stable_uniform(seed, key, epoch, "empty") < self.config.empty_rate:
            return None, ""
        available = [
            (source, weight, text)
            for source, weight in self._weights
            if weight > 0 and (text := captions.get(source) or "").strip()
        ]
        if not available:
            return None, ""
        index = weighted_index([weight for _, weight, _ in available], seed, key, epoch, "source")
        source, _, text = available[index]
        return source, text
