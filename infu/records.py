"""The sample record: one Arrow schema shared by every step.

Ingest fills the key, image and dataset annotation columns (``identity``, ``attributes``); later steps
fill the nullable ones (faces, identity embedding and its space, scores, captions per source,
aspect-ratio bucket). A record is a plain ``dict`` whose keys are the schema's field names, so rows
move unchanged between Parquet, the per-sample ``.json`` in a shard tar, Ray Data and DuckDB.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2
"""2 added ``identity``, ``attributes`` and ``face_embedding_space``: the readers of :mod:`infu.shards`
return them null for shards of version 1."""


class Status(StrEnum):
    OK = "ok"
    REJECTED = "rejected"


class RejectReason(StrEnum):
    """Why a sample was rejected; one value per sample, every score is kept beside it."""

    UNREADABLE = "unreadable"
    NOT_IMAGE = "not_image"
    BAD_IMAGE = "bad_image"
    TOO_LARGE = "too_large"
    TOO_SMALL = "too_small"
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    LOW_DETECTION_SCORE = "low_detection_score"
    EXTREME_POSE = "extreme_pose"
    BLUR = "blur"
    WATERMARK = "watermark"
    NSFW = "nsfw"
    LOW_AESTHETICS = "low_aesthetics"
    DUPLICATE = "duplicate"
    HELD_OUT_IDENTITY = "held_out_identity"
    ASPECT_RATIO = "aspect_ratio"
    NOT_REGULAR_FILE = "not_regular_file"
    SYMLINK_LOOP = "symlink_loop"
    SYMLINK_ESCAPE = "symlink_escape"
    SYMLINK_NOT_FOLLOWED = "symlink_not_followed"
    DUPLICATE_MEMBER = "duplicate_member"
    BAD_TAR = "bad_tar"
    LOW_IDENTITY_SIMILARITY = "low_identity_similarity"
    COPY_PASTE = "copy_paste"
    GENERATION_FAILED = "generation_failed"
    MISSING_IMAGE = "missing_image"


FACE_TYPE = pa.struct(
    [
        pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("keypoints", pa.list_(pa.float32(), 10), nullable=False),
        pa.field("yaw", pa.float32()),
        pa.field("pitch", pa.float32()),
        pa.field("roll", pa.float32()),
    ]
)
"""A detected face: x1,y1,x2,y2; detection score; 5 ArcFace keypoints flattened x0,y0..x4,y4; pose."""
# Columns from the dataset: its identity id (dataset-scoped: class folder, celebrity, clip...) and its
# attributes by name. Columns later steps fill: faces (largest first) and the largest face's identity
# embedding, the recognizer space it is in ("dlib", "arcface_ir_se50", "glintr100"), its identity cluster
# within the dataset (found by the filter), a 64-bit perceptual hash (stored as signed int64), scores by
# name, captions by source.

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("identity", pa.string()),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("sha256", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mime", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("faces", pa.list_(FACE_TYPE)),
        pa.field("face_embedding", pa.list_(pa.float32())),
        pa.field("face_embedding_space", pa.string()),
        pa.field("identity_cluster", pa.string()),
        pa.field("phash", pa.int64()),
        pa.field("scores", pa.map_(pa.string(), pa.float64())),
        pa.field("captions", pa.map_(pa.string(), pa.string())),
        pa.field("bucket_width", pa.int32()),
        pa.field("bucket_height", pa.int32()),
    ],
    metadata={b"infu_schema_version": str(SCHEMA_VERSION).encode()},
)

_MAP_COLUMNS = ("attributes", "scores", "captions")


def sample_key(dataset: str, source_path: str) -> str:
    """Stable key of a sample: the same source file always gets the same key (no dots: webdataset-safe).

    An undecodable file name (its bytes kept as surrogate escapes, as ``os`` and ``tarfile`` give them)
    is keyed by its raw bytes.
    """
    digest = hashlib.sha1(f"{dataset}/{source_path}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"{dataset}-{digest}"


def escape_undecodable(text: str) -> str:
    """``text`` (a file name, or a message naming one) as valid UTF-8: the bytes of a name that is not
    UTF-8 (surrogate escapes) are written ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def new_record(dataset: str, source_path: str, **values: Any) -> dict[str, Any]:
    """A record with every schema column present (unset ones are None), status ``ok`` by default."""
    record: dict[str, Any] = dict.fromkeys(SAMPLE_SCHEMA.names)
    record.update(
        key=sample_key(dataset, source_path),
        dataset=dataset,
        source_path=escape_undecodable(source_path),
        status=Status.OK.value,
    )
    unknown = set(values) - set(SAMPLE_SCHEMA.names)
    if unknown:
        raise KeyError(f"not sample columns: {sorted(unknown)}")
    record.update(values)
    return record


def with_every_column(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (maybe of an older schema version) with the columns it lacks set to None."""
    return {**dict.fromkeys(SAMPLE_SCHEMA.names), **record}


def reject(record: dict[str, Any], reason: RejectReason | str, detail: str | None = None) -> dict[str, Any]:
    """Mark a record rejected (the first reason wins: later checks never overwrite it)."""
    if record["status"] != Status.REJECTED:
        record.update(
            status=Status.REJECTED.value,
            reject_reason=RejectReason(reason).value,
            reject_detail=detail and escape_undecodable(detail),
        )
    return record


def records_to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records -> Arrow table with exactly :data:`SAMPLE_SCHEMA` (a missing column is an error)."""
    rows = []
    for record in records:
        missing = set(SAMPLE_SCHEMA.names) - set(record)
        if missing:
            raise KeyError(f"record {record.get('key')!r} lacks columns {sorted(missing)}")
        row = dict(record)
        for column in _MAP_COLUMNS:
            if isinstance(row[column], dict):
                row[column] = list(row[column].items())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow table -> records, map columns back to ``dict``."""
    records = table.to_pylist()
    for record in records:
        for column in _MAP_COLUMNS:
            if record.get(column) is not None:
                record[column] = dict(record[column])
    return records
