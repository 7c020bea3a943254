"""The precompute step's cache of frozen-encoder outputs, and its reading by the training loader.

A cache shard mirrors a filter shard: ``<key>.safetensors`` in its tar holds the trainable sample's
``latent`` and keypoint ``control`` latent distributions (``[2C, h, w]``: mean and log-variance, so the
training draws stay seeded and equal to encoding live) and ``text.<text_key>.embeds`` / ``.pooled`` for
each of its captions; its Parquet row (:data:`ENCODED_SCHEMA`) says from which image bytes (``sha256``), at
which size and by which encoders (:class:`~training.objective.FrozenEncoders` identities). An entry is
used only when all of these match the sample being trained; anything else is encoded live.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from infu.records import Status
from infu.shards import ShardTable, TarReader, committed_shards

LATENT = "latent"
CONTROL = "control"
EXTENSION = "safetensors"

ENCODED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("latent_encoder", pa.string()),
        pa.field("text_encoder", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
    ]
)


def text_key(text: str) -> str:
    """A caption's name in an entry."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def text_tensor_names(key: str) -> tuple[str, str]:
    """The tensors of the caption named ``key``: its token and its pooled embeddings."""
    return f"text.{key}.embeds", f"text.{key}.pooled"


class EncodedTable(ShardTable):
    """Cache rows (:data:`ENCODED_SCHEMA`); the stats count the cached captions too."""

    def to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {**super().counts(rows), "texts": sum(len(row["texts"] or []) for row in rows)}


ENCODED = EncodedTable()


@dataclass(frozen=True)
class Entry:
    """What the cache holds for one sample: latent distributions (None: not cached, or no keypoints for
    ``control``) and caption embeddings by text key."""

    latent: torch.Tensor | None
    control: torch.Tensor | None
    texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.texts.get(text_key(prompt))


class EncodedCache:
    """The committed cache shards in ``folder``, read for encoders of the given identities."""

    def __init__(self, folder: Path, latent_encoder: str, text_encoder: str):
        self.folder = Path(folder)
        self.latent_encoder = latent_encoder
        self.text_encoder = text_encoder
        self.shards = set(committed_shards(self.folder))

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a shard's rows while its samples are read
    def rows(self, shard: str) -> dict[str, dict[str, Any]]:
        if shard not in self.shards:
            return {}
        table = pq.read_table(self.folder / f"{shard}.parquet", schema=ENCODED_SCHEMA)
        return {row["key"]: row for row in table.to_pylist()}

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def tar(self, shard: str) -> TarReader:
        return TarReader(self.folder / f"{shard}.tar")

    def entry(self, shard: str, record: dict[str, Any], size: tuple[int, int]) -> Entry | None:
        """The cached encodings of ``record`` (a filter row of ``shard``) at ``size`` (width, height), or
        None when nothing cached fits."""
        from safetensors.torch import load as load_tensors

        row = self.rows(shard).get(record["key"])
        if (
            row is None
            or row["status"] != Status.OK
            or row["sha256"] != record["sha256"]
            or (row["width"], row["height"]) != size
        ):
            return None
        latents = row["latent_encoder"] == self.latent_encoder
        texts = row["text_encoder"] == self.text_encoder and bool(row["texts"])
        if not latents and not texts:
            return None
        tensors = load_tensors(self.tar(shard).read(f"{record['key']}.{EXTENSION}"))
        cached_texts = {}
        for key in row["texts"] if texts else []:
            embeds, pooled = text_tensor_names(key)
            cached_texts[key] = (tensors[embeds], tensors[pooled])
        return Entry(
            latent=tensors.get(LATENT) if latents else None,
            control=tensors.get(CONTROL) if latents else None,
            texts=cached_texts,
        )
