"""Records and shards: every schema column round-trips; a shard is committed atomically or not at all;
shards of schema version 1 read with the columns added since null."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infu.index import DatasetIndex
from infu.records import SAMPLE_SCHEMA, RejectReason, new_record, records_to_table, reject, sample_key
from infu.shards import (
    ShardWriter,
    clean_uncommitted,
    committed_shards,
    iter_samples,
    ray_records,
    read_records,
    read_stats,
    stats_path,
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
        identity="n000042",
        attributes={"Smiling": "true", "Eyeglasses": "false", "emotion": "happy, neutral"},
        face_embedding=[0.25, -0.5, 0.75, 0.125],
        face_embedding_space="dlib",
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


V2_COLUMNS = ("identity", "attributes", "face_embedding_space")
V1_SCHEMA = pa.schema(
    [field for field in SAMPLE_SCHEMA if field.name not in V2_COLUMNS],
    metadata={b"infu_schema_version": b"1"},
)
"""What schema version 1 wrote: the sample schema without the columns version 2 added."""


def write_v1_shard(out_dir: Path, name: str, records: list[dict]) -> list[dict]:
    """Commit ``records`` (all kept, image bytes ``b"jpeg"``) as a shard of schema version 1 wrote it: no
    v2 column in its Parquet file or tar records. Returns the records as they would read back now."""
    records = [dict(record, shard=name) for record in records]
    pq.write_table(
        records_to_table(records).select(V1_SCHEMA.names).cast(V1_SCHEMA), out_dir / f"{name}.parquet"
    )
    with tarfile.open(out_dir / f"{name}.tar", "w") as tar:
        for record in records:
            v1_record = {column: record[column] for column in V1_SCHEMA.names}
            for extension, data in (("jpg", b"jpeg"), ("json", json.dumps(v1_record).encode())):
                member = tarfile.TarInfo(f"{record['key']}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    stats_path(out_dir, name).write_text(json.dumps({"shard": name, "count": len(records)}))
    return [dict(record, **dict.fromkeys(V2_COLUMNS)) for record in records]


@pytest.fixture
def v1_and_v2_shards(tmp_path) -> tuple[Path, list[dict]]:
    """Shard 000000 of schema version 1, shard 000001 of the current one, and every record as it reads."""
    old = write_v1_shard(tmp_path, "000000", [full_record(0), full_record(1)])
    with ShardWriter(tmp_path, "000001") as writer:
        writer.add(full_record(2), b"png", "png")
        writer.commit()
    return tmp_path, [*old, dict(full_record(2), shard="000001")]


def test_shards_of_schema_version_1_read_with_the_new_columns_null(v1_and_v2_shards):
    out_dir, expected = v1_and_v2_shards
    old_schema = pq.read_schema(out_dir / "000000.parquet")
    assert old_schema.equals(V1_SCHEMA) and old_schema.metadata[b"infu_schema_version"] == b"1"
    assert pq.read_schema(out_dir / "000001.parquet").metadata[b"infu_schema_version"] == b"2"
    assert [record["identity"] for record in expected] == [None, None, "n000042"]

    assert read_records(out_dir) == expected
    assert [sample.record for sample in iter_samples(out_dir)] == expected
    rows = DatasetIndex(out_dir).query(
        "SELECT shard, identity, attributes['Smiling'] AS smiling, face_embedding_space AS space"
        " FROM samples ORDER BY shard, key"
    )
    assert rows == [
        {"shard": "000000", "identity": None, "smiling": None, "space": None},
        {"shard": "000000", "identity": None, "smiling": None, "space": None},
        {"shard": "000001", "identity": "n000042", "smiling": "true", "space": "dlib"},
    ]


@pytest.mark.slow
def test_ray_reads_shards_of_schema_version_1_with_the_new_columns_null(local_ray, v1_and_v2_shards):
    out_dir, expected = v1_and_v2_shards
    dataset = ray_records(out_dir)
    assert dataset.schema().names == SAMPLE_SCHEMA.names
    rows = dataset.select_columns(["key", *V2_COLUMNS]).take_all()
    by_key = {row["key"]: dict(row, attributes=row["attributes"] and dict(row["attributes"])) for row in rows}
    assert by_key == {
        record["key"]: {"key": record["key"], **{column: record[column] for column in V2_COLUMNS}}
        for record in expected
    }


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


def test_the_steps_read_tasks_and_phase_plans_import_no_torch():
    """A phase's reader processes import the step module that holds ``read_task``, and the job's driver
    plans the phase's stages (the caption engines' runtime envs included): torch (2-6 s per process on 2
    busy cores, 10 s of transformers on the driver) stays out of them; only model stages import it."""
    step_modules = "captioning.caption, filtering.filter, filtering.ingest"
    plan = "captioning.caption.caption_stages(captioning.config.CaptionConfig(blip2={}, internvl2={}))"
    probe = f"import sys, captioning.config, {step_modules}; {plan}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
