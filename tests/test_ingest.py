"""The ingest step on Ray Data: one record per input, expected reject reasons, resumable after a kill."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from filtering.ingest import LISTING, run_ingest, write_listing
from filtering.sources import open_source
from infu.config import load_config
from infu.index import DatasetIndex
from infu.manifest import read_manifest
from infu.runner import run_reduce
from infu.sample_corpus import build_sample_corpus, read_labels
from infu.shards import committed_shards, iter_samples, ray_records, ray_samples, read_records, shard_name

from .conftest import EMBEDDED, PROJECT_ROOT, kill_step_job_midway


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(path)
    return path


def embedded_config(run_dir, corpus, *extra):
    return load_config(EMBEDDED, [f"run.run_dir={run_dir}", f"ingest.source.path={corpus}", *extra])


def comparable(records):
    return sorted(records, key=lambda record: record["key"])


def test_ingest_records_every_input_with_its_expected_outcome(local_ray, corpus, tmp_path):
    config = embedded_config(tmp_path, corpus)
    manifest = run_ingest(config)
    out_dir = config.step_dir("ingest")
    labels = {label.path: label for label in read_labels(corpus)}

    index = DatasetIndex(out_dir)
    rows = index.query("SELECT source_path, coalesce(reject_reason, status) AS outcome FROM samples")
    assert len(rows) == len(labels) == 18
    assert {row["source_path"]: row["outcome"] for row in rows} == {
        path: label.expect_ingest for path, label in labels.items()
    }
    assert index.duplicate_keys() == []

    assert manifest["status"] == "complete"
    assert manifest["counts"]["samples"] == 18 and manifest["counts"]["ok"] == 14
    assert manifest["counts"]["reasons"] == {"bad_image": 1, "not_image": 1, "too_large": 1, "too_small": 1}
    assert manifest["inputs"]["ignored_files"] == {"jsonl": 1}
    assert manifest["identity"] == config.step_hash("ingest") and manifest["failed_shards"] == {}
    assert committed_shards(out_dir) == ["000000", "000001", "000002"]

    records = {record["source_path"]: record for record in read_records(out_dir)}
    assert (
        records["variants/exif_rotated.jpg"]["width"],
        records["variants/exif_rotated.jpg"]["height"],
    ) == (376, 478)
    assert records["people/astronaut.png"]["mime"] == "image/png"
    assert records["people/person_0.jpg"]["captions"] == {
        "original": "a smiling woman with long blond hair holding playing cards, portrait photo"
    }
    assert records["variants/truncated.jpg"]["sha256"] is not None
    assert "truncated" in records["variants/truncated.jpg"]["reject_detail"]

    samples = list(iter_samples(out_dir))
    assert len(samples) == 14
    for sample in samples:
        original = (corpus / sample.record["source_path"]).read_bytes()
        assert (
            hashlib.sha256(sample.image).hexdigest()
            == hashlib.sha256(original).hexdigest()
            == sample.record["sha256"]
        )


def test_rerun_skips_committed_shards_and_ray_reads_the_shards(local_ray, corpus, tmp_path):
    config = embedded_config(tmp_path, corpus)
    run_ingest(config)
    before = read_records(config.step_dir("ingest"))
    ray_rows = ray_records(config.step_dir("ingest")).take_all()
    assert sorted(row["key"] for row in ray_rows) == sorted(record["key"] for record in before)
    samples = ray_samples(config.step_dir("ingest")).take_all()
    assert len(samples) == 14
    by_key = {record["key"]: record for record in before}
    for sample in samples:
        record = by_key[sample["__key__"]]
        assert hashlib.sha256(sample["image"]).hexdigest() == record["sha256"]
        assert sample["json"]["key"] == record["key"]
    (config.step_dir("ingest") / "_manifest.json").unlink()  # shards of this identity are still reused
    manifest = run_ingest(config)
    assert manifest["run"]["shards_skipped"] == 3 and manifest["run"]["shards_written"] == 0
    assert read_records(config.step_dir("ingest")) == before


def test_rerun_with_another_config_supersedes_the_old_output(local_ray, corpus, tmp_path):
    first = embedded_config(tmp_path, corpus)
    run_ingest(first)
    old_rows = read_records(first.step_dir("ingest"))
    changed = embedded_config(tmp_path, corpus, "ingest.min_side=350")
    manifest = run_ingest(changed)
    assert manifest["identity"] == changed.step_hash("ingest") != first.step_hash("ingest")
    assert manifest["run"]["shards_skipped"] == 0 and manifest["counts"]["reasons"]["too_small"] == 4
    (moved,) = (tmp_path / "_superseded").iterdir()
    assert moved.name.startswith(f"ingest-{first.step_hash('ingest')[:12]}-")
    assert read_records(moved) == old_rows


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_rows(local_ray, corpus, tmp_path):
    """SIGKILL the job (driver and its local Ray) once 17 of its 18 one-file shards are committed while
    the last one's listing hangs unread (a FIFO nobody writes to: the one-file shards commit within
    milliseconds of each other, so a kill timed between two commits was a race); the rerun, with the
    listing file back, equals an uninterrupted run."""
    one_per_shard = ["ingest.shard_size=1", "ingest.resources.concurrency=1"]
    reference = embedded_config(tmp_path / "reference", corpus, *one_per_shard)
    run_ingest(reference)

    interrupted = embedded_config(tmp_path / "interrupted", corpus, *one_per_shard)
    out_dir = interrupted.step_dir("ingest")
    source = open_source(interrupted.step("ingest").source)
    run_reduce(
        out_dir / LISTING, interrupted.step_hash("ingest"), lambda folder: write_listing(source, 1, folder)
    )
    stalled = out_dir / LISTING / f"{shard_name(4)}.parquet"
    listing = stalled.read_bytes()
    stalled.unlink()
    os.mkfifo(stalled)
    overrides = [f"run.run_dir={tmp_path / 'interrupted'}", f"ingest.source.path={corpus}", *one_per_shard]
    done_before_kill = kill_step_job_midway("ingest", EMBEDDED, overrides, out_dir, after=17)
    assert done_before_kill == 17 and shard_name(4) not in committed_shards(out_dir)

    stalled.unlink()
    stalled.write_bytes(listing)
    manifest = run_ingest(interrupted)
    assert manifest["run"]["shards_skipped"] == 17
    assert manifest["run"]["shards_written"] == 1
    assert comparable(read_records(out_dir)) == comparable(read_records(reference.step_dir("ingest")))
    assert not (out_dir / "_tmp").exists()


@pytest.mark.slow
def test_a_shard_that_cannot_be_read_fails_alone_and_the_job_names_it(corpus, tmp_path):
    """A listing shard damaged after listing: the others commit, the job exits 1 naming it; a rerun heals."""
    config = embedded_config(tmp_path, corpus)
    listing = config.step_dir("ingest") / LISTING
    source = open_source(config.step("ingest").source)
    run_reduce(listing, config.step_hash("ingest"), lambda folder: write_listing(source, 8, folder))
    (listing / "000001.parquet").write_bytes(b"not parquet any more")
    command = [sys.executable, "-m", "filtering", "ingest", "--config", str(EMBEDDED)]
    command += ["--set", f"run.run_dir={tmp_path}", "--set", f"ingest.source.path={corpus}"]

    failed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "ingest: shard 000001 failed: chunk 0: read: ArrowInvalid" in failed.stderr
    assert committed_shards(config.step_dir("ingest")) == ["000000", "000002"]
    manifest = read_manifest(config.step_dir("ingest"))
    assert manifest["status"] == "failed" and list(manifest["failed_shards"]) == ["000001"]

    shutil.rmtree(listing)  # listed again on the rerun
    healed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert healed.returncode == 0, healed.stderr[-3000:]
    manifest = read_manifest(config.step_dir("ingest"))
    assert manifest["status"] == "complete" and manifest["run"]["shards_skipped"] == 2
    assert manifest["counts"]["samples"] == 18
