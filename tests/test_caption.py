"""The caption step: every kept sample captioned from several sources, one captions Parquet per filter
shard, caption stats per source, kill/resume to the same rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captioning.caption import AssembleStage, CaptionTable, run_caption
from captioning.config import CaptionQuality
from infu.captions import CAPTION_SOURCES, read_caption_rows, read_captions
from infu.config import load_config
from infu.shards import (
    ShardWriter,
    committed_shards,
    iter_samples,
    read_records,
    read_stats,
    shard_name,
    stats_path,
)

from .conftest import EMBEDDED, kill_step_job_midway


def kept_records(config) -> dict[str, dict]:
    return {
        record["key"]: record
        for record in read_records(config.step_dir("filter"))
        if record["status"] == "ok"
    }


def test_every_kept_sample_gets_an_attribute_caption_and_at_least_one_more(captioned_corpus):
    config, manifest = captioned_corpus
    out_dir = config.step_dir("caption")
    kept = kept_records(config)
    rows = read_captions(out_dir)
    assert sorted(rows) == sorted(kept) and len(rows) == 10
    assert manifest["status"] == "complete" and manifest["counts"]["samples"] == 10
    assert manifest["sources"] == ["original", "attribute", "small", "blip2"]
    for key, row in rows.items():
        assert row["attribute"] and row["attribute"].startswith("a ")
        captioned = [source for source in CAPTION_SOURCES if row[source]]
        assert len(captioned) >= 2, (key, row)
        assert row["internvl2"] is None  # not configured
        assert row["original"] == (kept[key]["captions"] or {}).get("original")
    with_text = [row for row in rows.values() if row["original"]]
    assert with_text, "the sample corpus has dataset text for some photos"


def test_one_captions_parquet_per_filter_shard_with_caption_stats(captioned_corpus):
    config, _ = captioned_corpus
    out_dir = config.step_dir("caption")
    filter_shards = committed_shards(config.step_dir("filter"))
    assert committed_shards(out_dir) == filter_shards
    assert not list(out_dir.glob("*.tar")), "image bytes are not copied again"
    for shard in filter_shards:
        stats = json.loads(stats_path(out_dir, shard).read_text())
        rows = read_caption_rows(out_dir / f"{shard}.parquet")
        kept_in_shard = [r for r in read_records(config.step_dir("filter")) if r["shard"] == shard]
        assert len(rows) == sum(1 for record in kept_in_shard if record["status"] == "ok")
        assert stats["count"] == len(rows) and stats["ok"] == len(rows)
        assert stats["captions"]["attribute"]["count"] == len(rows)
        assert sum(stats["captions"]["attribute"]["length_histogram"]["counts"]) == len(rows)
    totals = sum(stats["ok"] for stats in read_stats(out_dir))
    assert totals == 10


def test_the_model_free_sources_and_checks_make_the_row():
    assemble = AssembleStage(["original", "attribute", "small"], 0, CaptionQuality())
    record = {
        "key": "sample-1",
        "dataset": "sample",
        "captions": {"original": "  a man   in a suit "},
        "attributes": {"Smiling": "true"},
        "faces": [],
        "scores": {},
        "width": 512,
        "height": 512,
    }
    row = assemble.caption_row({"record": record, "image": None, "captions": {"small": "two men two men"}})
    assert row["key"] == "sample-1" and row["original"] == "a man in a suit"
    assert row["attribute"].startswith("a ")
    assert row["small"] is None and "multiple_people" in row["flags"]["small"]
    blank = assemble.caption_row({"record": {**record, "captions": {"original": " . "}}, "image": None})
    assert blank["original"] is None and blank["flags"]["original"] == ["empty"]
    missing = assemble.caption_row({"record": {**record, "captions": None}, "image": None})
    assert missing["original"] is None and "original" not in missing["flags"]
    counts = CaptionTable(["original", "small"]).counts([row, missing])
    assert (counts["ok"], counts["rejected"], counts["reasons"]) == (1, 1, {"no_caption": 1})


def one_sample_per_shard(filter_dir: Path, folder: Path) -> Path:
    """The kept samples of a filter output re-sharded one per shard: enough shards to kill a job between."""
    folder.mkdir()
    for index, sample in enumerate(iter_samples(filter_dir)):
        with ShardWriter(folder, shard_name(index)) as writer:
            writer.add(sample.record, sample.image, sample.extension)
            writer.commit()
    return folder


@pytest.mark.slow  # kill/resume of the shared runner: ingest, filter and training kill tests run in CI
def test_a_killed_caption_job_resumes_to_the_same_rows(captioned_corpus, local_ray, tmp_path):
    """A caption job over ten one-sample shards, SIGKILLed once nine are committed while the tenth's
    records hang unread (a stalled mount: a FIFO nobody writes to), then rerun with the file back: the
    caption rows equal those of an uninterrupted run.

    The stalled shard makes the kill land mid-run every time: the other shards take milliseconds each,
    and a kill timed between two of their commits was a race."""
    config, _ = captioned_corpus
    shards = one_sample_per_shard(config.step_dir("filter"), tmp_path / "shards")
    overrides = [f"caption.input={shards}", "caption.resources.concurrency=1"]
    reference = load_config(EMBEDDED, [f"run.run_dir={tmp_path / 'reference'}", *overrides])
    run_caption(reference)

    stalled = shards / f"{shard_name(4)}.parquet"
    records = stalled.read_bytes()
    stalled.unlink()
    os.mkfifo(stalled)
    interrupted_overrides = [f"run.run_dir={tmp_path / 'interrupted'}", *overrides]
    interrupted = load_config(EMBEDDED, interrupted_overrides)
    out_dir = interrupted.step_dir("caption")
    done = kill_step_job_midway("caption", EMBEDDED, interrupted_overrides, out_dir, after=9)
    assert done == 9 and shard_name(4) not in committed_shards(out_dir)

    stalled.unlink()
    stalled.write_bytes(records)
    manifest = run_caption(interrupted)

    assert manifest["run"]["caption"]["shards_skipped"] == 9
    rows = read_captions(out_dir)
    assert len(rows) == 10 and rows == read_captions(reference.step_dir("caption"))
