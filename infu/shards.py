"""Shards: webdataset tar + Parquet sidecar + stats JSON, committed atomically.

A shard ``NNNNNN`` is three files in a step's output folder:

* ``NNNNNN.tar`` — webdataset tar: for every kept sample ``<key>.<ext>`` (the original image bytes,
  never re-encoded), ``<key>.json`` (its record) and any further members ``<key>.<name>.<ext>`` (an SPMS
  pair's reference image);
* ``NNNNNN.parquet`` — one row per input sample, kept or rejected, with :data:`SAMPLE_SCHEMA`;
* ``NNNNNN_stats.json`` — counts, reject reasons, bytes, timings.

All three are written under ``_tmp/`` and renamed into place, the stats file last: **a shard exists
if and only if its stats file exists**. A writer killed at any point leaves no shard (only temp files
or stats-less leftovers, which :func:`clean_uncommitted` removes), so resuming means redoing every
shard whose stats file is missing.

The readers here return every record with :data:`SAMPLE_SCHEMA`'s columns: shards of an older schema
version read with the columns it lacked set to null.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from infu.images import extension_for_mime
from infu.paths import write_atomic
from infu.records import SAMPLE_SCHEMA, Status, records_to_table, table_to_records, with_every_column

TMP_DIR = "_tmp"
STATS_SUFFIX = "_stats.json"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def stats_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{STATS_SUFFIX}"


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class ShardTable:
    """What a shard's Parquet file holds: sample records (:data:`SAMPLE_SCHEMA`), unless a step writes
    rows of its own (a subclass: its table, and the counts of its stats)."""

    def to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        return records_to_table(rows)

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``ok``, ``rejected`` and ``reasons`` (read by the manifest), and any further stats."""
        statuses = Counter(row["status"] for row in rows)
        reasons = Counter(row["reject_reason"] for row in rows if row["reject_reason"])
        return {
            "ok": statuses.get(Status.OK.value, 0),
            "rejected": statuses.get(Status.REJECTED.value, 0),
            "reasons": dict(sorted(reasons.items())),
        }


RECORDS = ShardTable()


class ShardWriter:
    """Collects one shard's samples and commits them atomically.

    Use as a context manager: leaving the block with an exception (or without :meth:`commit`)
    discards everything written so far.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        extra_stats: dict[str, Any] | None = None,
        with_images: bool = True,
        table: ShardTable = RECORDS,
    ):
        self.out_dir = Path(out_dir)
        self.name = name
        self.extra_stats = extra_stats or {}
        self.with_images = with_images
        self.table = table
        self._tmp = self.out_dir / TMP_DIR / f"{name}-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir(parents=True)
        import webdataset as wds  # here, not at import: webdataset imports torch, which shard readers skip

        self._tar_file = open(self._tmp / f"{name}.tar", "wb")
        self._tar = wds.TarWriter(self._tar_file, encoder=False, mtime=0.0)
        self._records: list[dict[str, Any]] = []
        self._image_bytes = 0
        self._started = time.time()
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    def add(
        self,
        record: dict[str, Any],
        image: bytes | None = None,
        extension: str | None = None,
        members: dict[str, bytes] | None = None,
    ) -> None:
        """Add one sample. Kept samples carry their original image bytes and extension (unless the shard
        is records-only: ``with_images=False``), and maybe further ``members`` by dotted suffix."""
        record = dict(record, shard=self.name)
        if self.with_images and record["status"] == Status.OK:
            if image is None or not extension:
                raise ValueError(f"kept sample {record['key']} needs its image bytes and extension")
            if any("." not in suffix for suffix in members or {}):
                raise ValueError(
                    f"further members of {record['key']} need dotted suffixes: {list(members or {})}"
                )
            self._tar.write(
                {
                    "__key__": record["key"],
                    extension: image,
                    **(members or {}),
                    "json": json.dumps(record, default=_json_default).encode(),
                }
            )
            self._image_bytes += len(image) + sum(len(data) for data in (members or {}).values())
        self._records.append(record)

    def commit(self) -> dict[str, Any]:
        """Write Parquet and stats, then move the shard into place. Returns the stats."""
        self._tar.close()
        self._tar_file.flush()
        os.fsync(self._tar_file.fileno())
        self._tar_file.close()
        pq.write_table(self.table.to_table(self._records), self._tmp / f"{self.name}.parquet")
        stats = {
            "shard": self.name,
            "count": len(self._records),
            **self.table.counts(self._records),
            "image_bytes": self._image_bytes,
            "tar_bytes": (self._tmp / f"{self.name}.tar").stat().st_size if self.with_images else 0,
            "started": self._started,
            "seconds": round(time.time() - self._started, 4),
            **self.extra_stats,
        }
        for suffix in (".tar", ".parquet") if self.with_images else (".parquet",):
            os.replace(self._tmp / f"{self.name}{suffix}", self.out_dir / f"{self.name}{suffix}")
        write_atomic(stats_path(self.out_dir, self.name), json.dumps(stats, indent=1).encode())
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True
        return stats

    def abort(self) -> None:
        if not self._tar_file.closed:
            self._tar.close()
            self._tar_file.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True


def committed_shards(out_dir: Path) -> list[str]:
    """Names of the complete shards in ``out_dir``, sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(path.name[: -len(STATS_SUFFIX)] for path in out_dir.glob(f"*{STATS_SUFFIX}"))


def _unless_gone(function: object, path: str, error: tuple) -> None:
    """``shutil.rmtree`` error handler: a file removed meanwhile is fine, any other error is raised."""
    if not isinstance(error[1], FileNotFoundError):
        raise error[1]


def clean_uncommitted(out_dir: Path) -> list[str]:
    """Remove what killed writers left behind; returns the names of the removed files."""
    out_dir = Path(out_dir)
    removed = []
    tmp = out_dir / TMP_DIR
    if tmp.exists():
        removed += [str(path.relative_to(out_dir)) for path in tmp.rglob("*") if path.is_file()]
        # Workers of a killed run may still be winding down and removing their own parts meanwhile.
        shutil.rmtree(tmp, onerror=_unless_gone)
    committed = set(committed_shards(out_dir))
    for pattern in ("*.tar", "*.parquet"):
        for path in out_dir.glob(pattern):
            if path.stem not in committed:
                path.unlink()
                removed.append(path.name)
    for path in out_dir.glob(".*.tmp"):  # an atomic write cut short (infu.paths.write_atomic)
        path.unlink()
        removed.append(path.name)
    return removed


def read_stats(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(stats_path(Path(out_dir), name).read_text()) for name in committed_shards(out_dir)]


def parquet_paths(out_dir: Path) -> list[Path]:
    return [Path(out_dir) / f"{name}.parquet" for name in committed_shards(out_dir)]


def tar_paths(out_dir: Path) -> list[Path]:
    return [Path(out_dir) / f"{name}.tar" for name in committed_shards(out_dir)]


def read_parquet_records(path: Path) -> list[dict[str, Any]]:
    """The records of one shard's Parquet file."""
    return table_to_records(pq.read_table(path, schema=SAMPLE_SCHEMA))


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record (kept and rejected) of the committed shards, in shard order."""
    records: list[dict[str, Any]] = []
    for path in parquet_paths(out_dir):
        records += read_parquet_records(path)
    return records


class TarReader:
    """Random access to the members of one uncompressed shard tar (offsets read once from its headers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.members: dict[str, tuple[int, int]] = {}
        with tarfile.open(self.path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name in self.members:  # which of the two a record means is unknowable
                    raise ValueError(f"{self.path} has two members named {member.name}")
                self.members[member.name] = (member.offset_data, member.size)

    def read(self, name: str) -> bytes:
        offset, size = self.members[name]
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


class InputImages:
    """Original bytes of the records of committed shards, read from their shard tar (one open index at a
    time): items are ``{"record": ..., "tar": <its shard's tar>}``."""

    def __init__(self) -> None:
        self._tar: TarReader | None = None

    def tar(self, item: dict[str, Any]) -> TarReader:
        """The index of ``item``'s shard tar (kept while items come from the same shard)."""
        if self._tar is None or str(self._tar.path) != item["tar"]:
            self._tar = TarReader(Path(item["tar"]))
        return self._tar

    def read(self, item: dict[str, Any]) -> bytes:
        record = item["record"]
        return self.tar(item).read(f"{record['key']}.{extension_for_mime(record['mime'])}")


@dataclass(frozen=True)
class Sample:
    """A kept sample read back from a shard tar: its record, original image bytes and further members."""

    record: dict[str, Any]
    image: bytes
    extension: str
    members: dict[str, bytes] = field(default_factory=dict)


def iter_tar(path: Path) -> Iterator[Sample]:
    """Samples of one shard tar, in write order (streams: one sample in memory at a time); two samples
    written under one key come back as two samples, each with its own bytes."""
    with tarfile.open(path, "r|") as tar:
        members: dict[str, bytes] = {}
        current = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if current is not None and (key != current or extension in members):
                yield _sample(members)
                members = {}
            current = key
            handle = tar.extractfile(member)
            members[extension] = handle.read() if handle else b""
        if members:
            yield _sample(members)


def _sample(members: dict[str, bytes]) -> Sample:
    record = with_every_column(json.loads(members.pop("json")))
    (extension, image), *_ = ((name, data) for name, data in members.items() if "." not in name)
    further = {name: data for name, data in members.items() if "." in name}
    return Sample(record=record, image=image, extension=extension, members=further)


def iter_samples(out_dir: Path) -> Iterator[Sample]:
    """Every kept sample of the committed shards."""
    for path in tar_paths(out_dir):
        yield from iter_tar(path)


def ray_records(out_dir: Path):  # noqa: ANN201 - ray.data.Dataset, imported lazily
    """The records of the committed shards as a Ray Dataset (one row per input sample)."""
    import ray.data

    return ray.data.read_parquet([str(path) for path in parquet_paths(out_dir)], schema=SAMPLE_SCHEMA)


def _image_member_as_image(name: str) -> str:
    """``<key>.jpg`` / ``<key>.png`` -> ``<key>.image``: one column whatever each sample's format."""
    key, _, extension = name.partition(".")
    return name if extension == "json" else f"{key}.image"


def ray_samples(out_dir: Path):  # noqa: ANN201
    """The kept samples of the committed shards as a Ray Dataset: ``__key__``, ``image`` (original bytes;
    the format is the record's ``mime``) and ``json`` (the record, decoded)."""
    import ray.data

    return ray.data.read_webdataset(
        [str(path) for path in tar_paths(out_dir)], decoder=False, filerename=_image_member_as_image
    )
