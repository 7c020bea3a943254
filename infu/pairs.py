"""SPMS pairs: a synthetic image of a real person (the sample) and the real image it was made from (its
reference), as the synthesis step writes them and the SPMS filter and stage-2 training read them.

A pair row is a sample record of the synthetic image (:data:`~infu.records.SAMPLE_SCHEMA`: its faces,
embedding, scores, bucket) plus :data:`PAIR_FIELDS`: the reference's key, identity embedding, keypoints
and format, and how the image was made (prompt, seed, LoRAs, pose photo, generator, swap). In the shard
tar, ``<key>.png`` is the synthetic image and ``<key>.ref.<ext>`` the reference's original bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from infu.images import extension_for_mime
from infu.records import SAMPLE_SCHEMA, records_to_table, table_to_records
from infu.shards import ShardTable, TarReader

REFERENCE_MEMBER = "ref"
"""Tar member ``<key>.ref.<ext>``: the reference image's original bytes."""

PAIR_FIELDS = [
    pa.field("reference_key", pa.string(), nullable=False),
    pa.field("reference_mime", pa.string()),
    pa.field("reference_embedding", pa.list_(pa.float32())),
    pa.field("reference_keypoints", pa.list_(pa.float32(), 10)),
    pa.field("prompt", pa.string()),
    pa.field("prompt_axes", pa.map_(pa.string(), pa.string())),
    pa.field("seed", pa.int64()),
    pa.field("generator", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("lora_set", pa.string()),
    pa.field("loras", pa.map_(pa.string(), pa.float64())),
    pa.field("pose_photo", pa.string()),
    pa.field("swap_backend", pa.string()),
]
PAIR_SCHEMA = pa.schema([*SAMPLE_SCHEMA, *PAIR_FIELDS], metadata=SAMPLE_SCHEMA.metadata)
_PAIR_MAPS = ("prompt_axes", "loras")


def reference_member(record: dict[str, Any]) -> str:
    """The tar suffix of a pair's reference image: ``ref.<ext>``."""
    return f"{REFERENCE_MEMBER}.{extension_for_mime(record['reference_mime'])}"


class PairTable(ShardTable):
    """Shards of SPMS pair rows: sample columns (checked as sample records are) + :data:`PAIR_FIELDS`."""

    def to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        samples = records_to_table([{name: row[name] for name in SAMPLE_SCHEMA.names} for row in rows])
        pairs = [
            {
                field.name: list(row[field.name].items())
                if field.name in _PAIR_MAPS and isinstance(row[field.name], dict)
                else row[field.name]
                for field in PAIR_FIELDS
            }
            for row in rows
        ]
        extra = pa.Table.from_pylist(pairs, schema=pa.schema(PAIR_FIELDS))
        for field in PAIR_FIELDS:
            samples = samples.append_column(field, extra[field.name])
        return samples.replace_schema_metadata(PAIR_SCHEMA.metadata)


PAIRS = PairTable()


def read_pair_records(path: Path) -> list[dict[str, Any]]:
    """The pair rows of one shard's Parquet file."""
    rows = table_to_records(pq.read_table(path, schema=PAIR_SCHEMA))
    for row in rows:
        for name in _PAIR_MAPS:
            if row[name] is not None:
                row[name] = dict(row[name])
    return rows


def read_reference(tar: TarReader, record: dict[str, Any]) -> bytes:
    """The reference image's original bytes of a pair in its shard tar."""
    return tar.read(f"{record['key']}.{reference_member(record)}")
