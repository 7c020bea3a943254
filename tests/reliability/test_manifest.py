"""Reruns are decided by the output folder: a changed source, a failed first run, a deleted manifest.

Defects 6, 8 and 14 of issue 9, reproduced as the step's Ray job runs a step (``run_step_here``, here
in-process on the module's local Ray), with the issue's inputs: 256x256 RGB JPEGs, ``shard_size: 2``.

- 6: the source folder changes and the same config runs again. Policy: the listing the first run
  persisted (``ingest/_listing/``) is what the step covers. A complete step does nothing and says so;
  an interrupted one finishes exactly the shards of that listing (no re-slicing, no key in two
  shards); another ``run_dir`` lists the folder anew. The manifest's counts are the rows on disk.
- 8: a run that failed (a typo in a path), before or after it wrote its manifest, does not block the
  corrected run in the same run folder.
- 14: with ``_manifest.json`` deleted, the same config resumes its own shards, and another config
  never takes them: they are moved aside and every shard of the new output carries the new identity.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from filtering.sources import SourceError
from infu.config import load_config
from infu.manifest import MANIFEST_NAME, SUPERSEDED_DIR, open_step_output, read_manifest
from infu.shards import committed_shards, read_records, read_stats
from infu.steps import run_step_here

from ..conftest import EMBEDDED

pytestmark = pytest.mark.slow  # eight ingest runs on Ray: about 2 minutes on 2 busy cores

STEP = "ingest"


def image(path: Path) -> None:
    """The issue's ``a.jpg``: a 256x256 RGB JPEG."""
    Image.new("RGB", (256, 256), "red").save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The issue's ``f6``: a.jpg, b.jpg, c.jpg, d.jpg."""
    source = tmp_path / "f6"
    source.mkdir()
    for name in "abcd":
        image(source / f"{name}.jpg")
    return source


def config_for(run_dir: Path, source: Path, *extra: str):  # noqa: ANN201 - the registry's RunConfig
    """The issue's ``$ING $R``: a folder source, dataset ``d``, two inputs per shard."""
    overrides = [
        f"run.run_dir={run_dir}",
        "ingest.source.kind=folder",
        f"ingest.source.path={source}",
        "ingest.source.dataset=d",
        "ingest.shard_size=2",
        "ingest.resources.concurrency=1",  # not part of the identity; fewer workers to start
        *extra,
    ]
    return load_config(EMBEDDED, overrides)


def grow(source: Path) -> None:
    """The issue's change: ``0.jpg`` sorts before every listed file, ``e.jpg`` after them."""
    image(source / "0.jpg")
    image(source / "e.jpg")


def members(out_dir: Path) -> dict[str, list[str]]:
    """Source paths by shard, from the shards' Parquet indexes."""
    shards: dict[str, list[str]] = {}
    for record in read_records(out_dir):
        shards.setdefault(record["shard"], []).append(record["source_path"])
    return {shard: sorted(paths) for shard, paths in sorted(shards.items())}


def assert_consistent(out_dir: Path, manifest: dict) -> None:
    """No key in two rows; the manifest is complete and counts exactly the rows and shards on disk."""
    records = read_records(out_dir)
    assert [key for key, n in Counter(record["key"] for record in records).items() if n > 1] == []
    assert manifest == read_manifest(out_dir)
    assert manifest["status"] == "complete" and manifest["failed_shards"] == {}
    assert manifest["counts"]["samples"] == len(records)
    assert manifest["counts"]["shards"] == len(committed_shards(out_dir))


def files(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir()) if path.is_file()}


FIRST_SHARDS = {"000000": ["a.jpg", "b.jpg"], "000001": ["c.jpg", "d.jpg"]}


def test_6_a_complete_step_is_not_redone_when_its_source_folder_changes(local_ray, folder, tmp_path, capsys):
    config = config_for(tmp_path / "r6", folder)
    out_dir = config.step_dir(STEP)
    first = run_step_here(config, STEP)
    assert members(out_dir) == FIRST_SHARDS
    assert_consistent(out_dir, first)
    before = files(out_dir)

    grow(folder)
    capsys.readouterr()
    again = run_step_here(config_for(tmp_path / "r6", folder), STEP)
    said = capsys.readouterr().out
    assert f"{out_dir} is complete for identity {first['identity'][:12]}; nothing to do" in said
    assert again == first and files(out_dir) == before  # nothing rewritten, nothing re-sliced
    assert members(out_dir) == FIRST_SHARDS


def test_6_an_interrupted_step_finishes_the_listing_it_started_with(local_ray, folder, tmp_path):
    """A run killed after shard 000000 committed leaves a ``running`` manifest and shard 000001 absent
    (a shard exists iff its stats file does); the folder then changes. The rerun cuts no new shards."""
    config = config_for(tmp_path / "r6", folder)
    out_dir = config.step_dir(STEP)
    run_step_here(config, STEP)
    kept = {name: data for name, data in files(out_dir).items() if name.startswith("000000")}
    open_step_output(config, STEP, config.step(STEP))  # the killed run's start: manifest `running`
    for name in ("000001.tar", "000001.parquet", "000001_stats.json"):
        (out_dir / name).unlink()
    assert read_manifest(out_dir)["status"] == "running" and committed_shards(out_dir) == ["000000"]

    grow(folder)
    manifest = run_step_here(config_for(tmp_path / "r6", folder), STEP)
    assert manifest["run"]["shards_skipped"] == 1 and manifest["run"]["shards_written"] == 1
    assert members(out_dir) == FIRST_SHARDS  # not {0, a}, {b, c}, {d, e}
    assert {name: files(out_dir)[name] for name in kept} == kept
    assert_consistent(out_dir, manifest)

    # Another run folder is another output: it lists the folder as it is now.
    fresh = config_for(tmp_path / "r6-new", folder)
    renewed = run_step_here(fresh, STEP)
    assert members(fresh.step_dir(STEP)) == {
        "000000": ["0.jpg", "a.jpg"],
        "000001": ["b.jpg", "c.jpg"],
        "000002": ["d.jpg", "e.jpg"],
    }
    assert_consistent(fresh.step_dir(STEP), renewed)


def test_8_a_failed_run_does_not_block_the_corrected_rerun_into_the_same_folder(local_ray, folder, tmp_path):
    run_dir = tmp_path / "r8"
    with pytest.raises(SourceError, match="typo does not exist"):  # the typo: refused up front
        run_step_here(config_for(run_dir, tmp_path / "typo"), STEP)
    # A typo found only once the run has started (the captions file is read while listing): the
    # failed run leaves its `running` manifest, of another identity than the corrected run's.
    typo_captions = config_for(run_dir, folder, f"ingest.source.captions={tmp_path / 'typo.jsonl'}")
    with pytest.raises(SourceError, match="typo.jsonl"):
        run_step_here(typo_captions, STEP)
    out_dir = typo_captions.step_dir(STEP)
    failed = read_manifest(out_dir)
    assert failed["status"] == "running" and failed["identity"] == typo_captions.step_hash(STEP)

    corrected = config_for(run_dir, folder)
    manifest = run_step_here(corrected, STEP)
    assert manifest["identity"] == corrected.step_hash(STEP) != failed["identity"]
    assert members(out_dir) == FIRST_SHARDS
    assert_consistent(out_dir, manifest)
    assert not (run_dir / SUPERSEDED_DIR).exists()  # the failed run committed nothing: removed, not kept


def test_14_a_deleted_manifest_never_lets_another_config_take_the_old_shards(local_ray, folder, tmp_path):
    run_dir = tmp_path / "r6"
    config = config_for(run_dir, folder)
    out_dir = config.step_dir(STEP)
    first = run_step_here(config, STEP)
    old_rows = read_records(out_dir)
    grow(folder)

    # Same config: its own shards (their stats name its identity) and its listing are resumed.
    (out_dir / MANIFEST_NAME).unlink()
    resumed = run_step_here(config, STEP)
    assert resumed["run"]["shards_skipped"] == 2 and resumed["run"]["shards_written"] == 0
    assert resumed["identity"] == first["identity"] and read_records(out_dir) == old_rows
    assert_consistent(out_dir, resumed)

    # Another config (the issue's `--set ingest.min_side=10000`): the old shards are moved aside.
    (out_dir / MANIFEST_NAME).unlink()
    changed = config_for(run_dir, folder, "ingest.min_side=10000")
    manifest = run_step_here(changed, STEP)
    assert manifest["identity"] == changed.step_hash(STEP) != first["identity"]
    assert manifest["run"]["shards_skipped"] == 0
    assert {stats["identity"] for stats in read_stats(out_dir)} == {manifest["identity"]}
    records = read_records(out_dir)
    assert len(records) == 6 and {record["reject_reason"] for record in records} == {"too_small"}
    assert_consistent(out_dir, manifest)
    (moved,) = (run_dir / SUPERSEDED_DIR).iterdir()
    assert moved.name.startswith(f"{STEP}-{first['identity'][:12]}-")
    assert {stats["identity"] for stats in read_stats(moved)} == {first["identity"]}
    assert read_records(moved) == old_rows
    assert (
        json.loads((out_dir / "_listing" / "_complete.json").read_text())["identity"]
        == (manifest["identity"])
    )
