"""Lineage: step identities, supersession of stale outputs, and done-ness decided by the output folder."""

from __future__ import annotations

import json

import pytest

from infu.config import load_config
from infu.lineage import completed_manifest, output_tag
from infu.manifest import open_step_output, read_manifest
from infu.records import new_record
from infu.shards import ShardWriter
from infu.steps import StepError, get_step, pipeline_order

from .conftest import EMBEDDED


def identities(*overrides: str) -> tuple[str, str]:
    config = load_config(EMBEDDED, list(overrides))
    return config.step_hash("ingest"), config.step_hash("filter")


def test_an_upstream_change_changes_every_identity_after_it():
    ingest, filter_ = identities()
    changed_ingest = identities("ingest.min_side=65")
    assert changed_ingest[0] != ingest and changed_ingest[1] != filter_
    assert identities("filter.thresholds.max_watermark=0.4") != (ingest, filter_)
    assert identities("filter.thresholds.max_watermark=0.4")[0] == ingest
    quality_changed = identities("quality.batch_size=3")
    assert quality_changed[0] == ingest and quality_changed[1] != filter_


def test_resources_run_folder_and_run_name_are_not_part_of_an_identity(tmp_path):
    assert (
        identities(
            "ingest.resources.concurrency=7",
            "filter.resources.stages={decode: {concurrency: 3}}",
            f"run.run_dir={tmp_path}",
            "run.name=other",
        )
        == identities()
    )
    assert output_tag(tmp_path / "a") != output_tag(tmp_path / "b")


def test_an_explicit_input_folder_contributes_its_manifest_identity(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    before = identities(f"filter.input={raw}")[1]
    assert before != identities()[1]
    (raw / "_manifest.json").write_text(json.dumps({"status": "complete", "identity": "abc"}))
    assert identities(f"filter.input={raw}")[1] != before


def test_the_registry_orders_steps_and_names_unknown_ones():
    order = [
        "ingest",
        "filter",
        "caption",
        "precompute",
        "stage1",
        "synth",
        "spms",
        "stage2",
        "benchmark",
        "eval",
    ]
    assert pipeline_order() == order, "precompute feeds stage1: it runs first"
    assert get_step("filter").upstream == ("ingest",) and get_step("filter").package == "filtering"
    assert get_step("caption").upstream == ("filter",) and get_step("caption").package == "captioning"
    assert get_step("stage1").upstream == ("filter", "caption") and get_step("stage1").package == "training"
    assert get_step("spms").job_arguments() == ["-m", "datagen", "filter"]  # its command is not its name
    registered = ", ".join(order)
    with pytest.raises(StepError, match=f"unknown step 'train'; registered steps: {registered}"):
        get_step("train")


def commit_shard(out_dir, identity: str) -> None:
    with ShardWriter(out_dir, "000000", {"identity": identity}, with_images=False) as writer:
        writer.add(new_record("d", "a.jpg", status="rejected", reject_reason="too_small"))
        writer.commit()


def test_output_of_another_identity_is_moved_aside_and_this_one_resumes(tmp_path):
    config = load_config(EMBEDDED, [f"run.run_dir={tmp_path}"])
    changed = load_config(EMBEDDED, [f"run.run_dir={tmp_path}", "ingest.min_side=65"])
    section = config.step("ingest")
    output = open_step_output(config, "ingest", section)
    commit_shard(output.out_dir, output.identity)
    assert completed_manifest(config, "ingest") is None
    output.complete()
    assert completed_manifest(config, "ingest")["identity"] == config.step_hash("ingest")
    assert completed_manifest(changed, "ingest") is None

    open_step_output(config, "ingest", section)  # same identity: resumed in place
    assert (tmp_path / "ingest" / "000000_stats.json").exists()
    assert read_manifest(tmp_path / "ingest")["status"] == "running"

    (tmp_path / "ingest" / "_manifest.json").unlink()  # shards still name their identity
    open_step_output(changed, "ingest", changed.step("ingest"))
    (moved,) = (tmp_path / "_superseded").iterdir()
    assert moved.name.startswith(f"ingest-{config.step_hash('ingest')[:12]}-")
    assert (moved / "000000_stats.json").exists() and not (tmp_path / "ingest" / "000000_stats.json").exists()


def test_a_run_that_committed_nothing_does_not_block_the_corrected_rerun(tmp_path):
    typo = load_config(EMBEDDED, [f"run.run_dir={tmp_path}", "ingest.source.path=/absent"])
    open_step_output(typo, "ingest", typo.step("ingest"))  # the failed run's leftovers: a running manifest
    fixed = load_config(EMBEDDED, [f"run.run_dir={tmp_path}"])
    output = open_step_output(fixed, "ingest", fixed.step("ingest"))
    assert read_manifest(output.out_dir)["identity"] == fixed.step_hash("ingest")
    assert not (tmp_path / "_superseded").exists()
