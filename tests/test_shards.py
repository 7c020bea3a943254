"""Records and shards: every schema column round-trips; a shard is committed atomically or not at all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from infu.index import DatasetIndex
from infu.records import SAMPLE_SCHEMA, RejectReason, new_record, records_to_table, reject, sample_key
from infu.shards import (
    ShardWriter,
    clean_uncommitted,
    committed_shards,
    iter_samples,
    read_records,
    read_stats,
)

from .conftest import PROJECT_ROOT


def full_record(index: int) -> dict:
    """A record with every column set to a non-default value."""
    return new_record(
        "ffhq",
        f"images/{index:05d}.png",
        sha256=f"{index:064x}",
        size_bytes=1000 + index,
        width=1024,
        height=768 + index,
        mime="image/png",
        faces=[
            {
                "bbox": [1.5, 2.5, 100.0, 120.0],
                "score": 0.875,
                "keypoints": [float(i) for i in range(10)],
                "yaw": -12.5,
                "pitch": 3.0,
                "roll": 0.5,
            },
            {
                "bbox": [200.0, 20.0, 240.0, 70.0],
                "score": 0.625,
                "keypoints": [float(-i) for i in range(10)],
                "yaw": None,
                "pitch": None,
                "roll": None,
            },
        ],
        face_embedding=[0.25, -0.5, 0.75, 0.125],
        identity_cluster="ffhq-c000042",
        phash=-(2**63) + index,
        scores={"aesthetic": 6.25, "nsfw": 0.01, "blur": 153.5},
        captions={"original": "a portrait", "blip2": "a woman smiling", "internvl2": "ünïcode ✓"},
        bucket_width=896,
        bucket_height=1152,
    )


def test_every_column_round_trips_through_parquet_and_tar(tmp_path):
    kept = full_record(1)
    rejected = reject(full_record(2), RejectReason.MULTIPLE_FACES, "2 faces")
    with ShardWriter(tmp_path, "000000") as writer:
        writer.add(kept, b"\x89PNG original bytes", "png")
        writer.add(rejected)
        stats = writer.commit()

    records = read_records(tmp_path)
    assert records == [dict(kept, shard="000000"), dict(rejected, shard="000000")]
    assert set(records[0]) == set(SAMPLE_SCHEMA.names)
    assert pq.read_schema(tmp_path / "000000.parquet").equals(SAMPLE_SCHEMA, check_metadata=False)

    samples = list(iter_samples(tmp_path))
    assert len(samples) == 1
    assert samples[0].image == b"\x89PNG original bytes" and samples[0].extension == "png"
    assert samples[0].record == dict(kept, shard="000000")

    assert stats["count"] == 2 and stats["ok"] == 1 and stats["rejected"] == 1
    assert stats["reasons"] == {"multiple_faces": 1}
    assert read_stats(tmp_path) == [stats]


def test_tar_is_a_webdataset_with_original_bytes(tmp_path):
    records = [full_record(index) for index in range(3)]
    with ShardWriter(tmp_path, "000007") as writer:
        for index, record in enumerate(records):
            writer.add(record, bytes([index]) * 10, "jpg")
        writer.commit()
    with tarfile.open(tmp_path / "000007.tar") as tar:
        names = tar.getnames()
        assert names == [f"{record['key']}.{ext}" for record in records for ext in ("jpg", "json")]
        assert tar.extractfile(names[2]).read() == bytes([1]) * 10
        assert json.loads(tar.extractfile(names[1]).read())["key"] == records[0]["key"]


def test_keys_are_stable_and_webdataset_safe():
    assert sample_key("ffhq", "a/b.c.png") == sample_key("ffhq", "a/b.c.png")
    assert sample_key("ffhq", "a/b.c.png") != sample_key("celeba", "a/b.c.png")
    assert "." not in sample_key("ffhq", "a/b.c.png")


def test_records_need_every_column_and_kept_samples_need_bytes(tmp_path):
    record = full_record(0)
    del record["bucket_width"]
    with pytest.raises(KeyError, match="bucket_width"):
        records_to_table([record])
    with pytest.raises(KeyError, match="not sample columns"):
        new_record("d", "p", colour="red")
    with ShardWriter(tmp_path, "000000") as writer, pytest.raises(ValueError, match="needs its image bytes"):
        writer.add(full_record(0))
    assert committed_shards(tmp_path) == []


def test_first_reject_reason_wins():
    record = reject(full_record(0), RejectReason.NO_FACE, "none")
    reject(record, RejectReason.BLUR, "blurry")
    assert (record["status"], record["reject_reason"], record["reject_detail"]) == (
        "rejected",
        "no_face",
        "none",
    )


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "000000") as writer:
        writer.add(full_record(0), b"x", "jpg")
        raise RuntimeError("worker crashed")
    assert committed_shards(tmp_path) == []
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == []


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    """SIGKILL a real writer process mid-shard: no shard appears, leftovers are cleaned, a rerun completes."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from tests.test_shards import full_record
        from infu.shards import ShardWriter
        writer = ShardWriter(sys.argv[1], "000000")
        for index in range(100000):
            writer.add(full_record(index), b"x" * 2048, "jpg")
            if index == 50:
                print("writing", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    assert committed_shards(tmp_path) == []
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob("*.parquet")) == []
    assert (tmp_path / "_tmp").exists()
    removed = clean_uncommitted(tmp_path)
    assert any(name.endswith("000000.tar") for name in removed)
    assert not (tmp_path / "_tmp").exists()


def test_files_without_stats_are_not_a_shard(tmp_path):
    """A crash between the renames of a commit: tar and parquet in place but no stats file."""
    with ShardWriter(tmp_path, "000000") as writer:
        writer.add(full_record(0), b"x", "jpg")
        writer.commit()
    (tmp_path / "000000_stats.json").unlink()
    (tmp_path / ".000000_stats.json.1a2b3c4d.tmp").write_text("{")  # the stats write itself was cut short
    assert committed_shards(tmp_path) == []
    assert read_records(tmp_path) == []
    assert sorted(clean_uncommitted(tmp_path)) == [
        ".000000_stats.json.1a2b3c4d.tmp",
        "000000.parquet",
        "000000.tar",
    ]
    assert list(tmp_path.iterdir()) == []


def test_index_counts_and_queries(tmp_path):
    for shard, reasons in (("000000", [None, "no_face"]), ("000001", [None, None, "blur"])):
        with ShardWriter(tmp_path, shard) as writer:
            for index, reason in enumerate(reasons):
                record = full_record(int(shard) * 10 + index)
                if reason:
                    writer.add(reject(record, reason))
                else:
                    writer.add(record, b"x", "jpg")
            writer.commit()
    (tmp_path / "000002.parquet").write_bytes(b"uncommitted leftover")
    index = DatasetIndex(tmp_path)
    assert index.count() == 5
    assert index.reason_counts() == {"blur": 1, "no_face": 1, "ok": 3}
    assert index.duplicate_keys() == []
    rows = index.query(
        "SELECT scores['aesthetic'] AS aesthetic, captions['blip2'] AS blip2 FROM samples LIMIT 1"
    )
    assert rows == [{"aesthetic": 6.25, "blip2": "a woman smiling"}]
    wide = index.query("SELECT count(*) AS n FROM samples WHERE height > $height", height=770)
    assert wide == [{"n": 3}]
