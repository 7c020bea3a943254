"""The bad-input corpus (``corpus.py``) through one real ingest: every file gets its expected outcome.

One folder source holds every case (EXIF orientations, colour modes, animations, bombs, empty,
truncated and non-image files, too-small images, unusual names); one ingest run on the module's local
Ray reads it. The run must complete with no failed shard and exactly one row per image-named file; each
row has its expected status or reject reason, kept rows their expected size (EXIF orientation applied)
and mime, and every row the sha256 of its source file, which kept samples' bytes match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from infu.config import load_config
from infu.sample_corpus import corpus_digest

from .corpus import (
    IGNORED,
    MAX_PIXELS,
    MIN_SIDE,
    OK,
    BadInput,
    bad_inputs,
    build_bad_input_corpus,
    expected_ignored_files,
)
from .test_sources import EMBEDDED, Ingested, ingest

pytestmark = pytest.mark.timeout(300)

CASES = [case for case, _ in bad_inputs()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, BadInput]]:
    folder = tmp_path_factory.mktemp("bad_inputs") / "src"
    return folder, {case.name: case for case in build_bad_input_corpus(folder)}


@pytest.fixture(scope="module")
def run(local_ray, corpus, tmp_path_factory) -> Ingested:
    folder, cases = corpus
    rows = {case.path for case in cases.values() if case.expect != IGNORED}
    return ingest(tmp_path_factory.mktemp("bad_inputs_run"), "folder", folder, rows)


def test_the_outcomes_assume_the_embedded_ingest_limits():
    limits = load_config(EMBEDDED, []).step("ingest")
    assert (limits.min_side, limits.max_pixels) == (MIN_SIDE, MAX_PIXELS)


def test_the_run_completes_with_one_row_per_image_file_and_counts_the_others(run, corpus):
    """``ingest`` (test_sources) has checked: complete, no failed shard, exactly one row per image-named
    file, distinct keys, rejects counted by reason, kept samples exactly the ``ok`` rows."""
    _, cases = corpus
    assert run.manifest["status"] == "complete" and run.manifest["failed_shards"] == {}
    assert (
        run.manifest["counts"]["samples"]
        == len(run.records)
        == sum(c.expect != IGNORED for c in cases.values())
    )
    assert run.manifest["inputs"]["ignored_files"] == expected_ignored_files(list(cases.values()))


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_each_bad_input_gets_its_expected_outcome(run, corpus, case: BadInput):
    folder, cases = corpus
    if case.name not in cases:
        pytest.skip(f"the file system refused the name {case.path!r}")
    source = (folder / case.path).read_bytes()
    if case.expect == IGNORED:
        assert case.path not in run.records
        return
    record = run.records[case.path]
    assert (record["reject_reason"] or record["status"]) == case.expect, record["reject_detail"]
    assert record["sha256"] == hashlib.sha256(source).hexdigest()
    assert record["size_bytes"] == len(source)
    if case.size is not None:
        assert (record["width"], record["height"], record["mime"]) == (case.width, case.height, case.mime)
    if case.expect == OK:
        assert run.samples[case.path].image == source
    else:
        assert case.path not in run.samples


def test_the_generator_is_deterministic(tmp_path):
    first = build_bad_input_corpus(tmp_path / "a")
    second = build_bad_input_corpus(tmp_path / "b")
    assert first == second
    assert corpus_digest(tmp_path / "a") == corpus_digest(tmp_path / "b")
