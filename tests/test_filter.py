"""The SPSS filter: decision rules, expected decisions on the sample corpus and real photos, kill/resume,
shards of schema version 1 as input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from filtering.config import FilterThresholds
from filtering.filter import (
    SCORED,
    decide,
    face_sharpness,
    read_input_shard,
    run_filter,
    scored_embedding_space,
)
from filtering.global_phase import DECISIONS, compute_global_decisions
from filtering.ingest import run_ingest
from infu.config import load_config
from infu.face import Face, HeadPose
from infu.index import DatasetIndex
from infu.sample_corpus import build_sample_corpus, read_labels
from infu.shards import ShardWriter, iter_samples, read_records
from infu.steps import StepError

from .conftest import CORPUS_SHARD_SIZE, EMBEDDED, corpus_overrides, kill_step_job_midway
from .test_shards import V2_COLUMNS, full_record, write_v1_shard

GOOD = {
    "min_side": 512.0,
    "face_count": 1.0,
    "face_px": 200.0,
    "face_area_ratio": 0.2,
    "second_face_ratio": 0.0,
    "detection_score": 1.0,
    "yaw": 5.0,
    "pitch": -3.0,
    "sharpness": 100.0,
    "watermark": 0.1,
    "nsfw": 0.01,
    "aesthetic": 6.0,
    "aspect_error": 0.05,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"min_side": 100.0}, "too_small"),
        ({"face_count": 0.0}, "no_face"),
        ({"face_count": 2.0, "second_face_ratio": 0.5}, "multiple_faces"),
        ({"face_px": 30.0}, "face_too_small"),
        ({"face_area_ratio": 0.001}, "face_too_small"),
        ({"yaw": -75.0}, "extreme_pose"),
        ({"pitch": 50.0}, "extreme_pose"),
        ({"sharpness": 3.0}, "blur"),
        ({"watermark": 0.9}, "watermark"),
        ({"nsfw": 0.9}, "nsfw"),
        ({"held_out_similarity": 0.95}, "held_out_identity"),
        ({"aspect_error": 0.9}, "aspect_ratio"),
    ],
)
def test_each_rule_rejects_with_its_reason(change, reason):
    rules = FilterThresholds(same_identity_similarity=0.92)
    assert decide(GOOD, rules) is None
    decision = decide({**GOOD, **change}, rules)
    assert decision is not None and decision[0].value == reason


def test_thresholds_apply_to_stored_scores_without_recomputing():
    scores = {**GOOD, "aesthetic": 4.5, "face_count": 2.0, "second_face_ratio": 0.1}
    assert decide(scores, FilterThresholds()) is None
    assert decide(scores, FilterThresholds(min_aesthetic=5.0))[0].value == "low_aesthetics"
    assert decide(scores, FilterThresholds(second_face_ratio=0.05))[0].value == "multiple_faces"
    assert decide(scores, FilterThresholds(min_detection_score=2.0))[0].value == "low_detection_score"


def test_face_sharpness_drops_with_blur(tmp_path):
    build_sample_corpus(tmp_path)
    image = Image.open(tmp_path / "people/person_2.jpg").convert("RGB")
    face = Face(
        bbox=np.array([100, 100, 350, 380], np.float32),
        score=1.0,
        kps=np.zeros((5, 2), np.float32),
        embedding=np.zeros(128, np.float32),
        pose=HeadPose(0.0, 0.0, 0.0),
    )
    sharp = face_sharpness(np.asarray(image), face)
    blurred = face_sharpness(np.asarray(image.filter(ImageFilter.GaussianBlur(4))), face)
    assert blurred < sharp / 4


def test_scored_shards_of_schema_versions_1_and_2_go_through_the_global_and_write_phases(tmp_path):
    """A run resumed across the upgrade: scored shard 000000 of version 1, 000001 of version 2. Three
    near-duplicate pHashes of one face: the first key is kept, in one identity cluster."""
    scored = tmp_path / SCORED
    scored.mkdir()
    old = write_v1_shard(scored, "000000", [full_record(0), full_record(1)])
    with ShardWriter(scored, "000001", with_images=False) as writer:
        writer.add(full_record(2))
        writer.commit()
    stats = compute_global_decisions(
        scored, tmp_path / "global", FilterThresholds(max_phash_distance=4, same_identity_similarity=0.4)
    )
    assert stats["kept_rows"] == 3

    rows = [
        item["record"]
        for shard in ("000000", "000001")
        for item in read_input_shard(
            {
                "records": str(scored / f"{shard}.parquet"),
                "decisions": str(tmp_path / "global" / DECISIONS / f"{shard}.parquet"),
                "tar": "unused",
            }
        )
    ]
    assert [row["key"] for row in rows] == [record["key"] for record in [*old, full_record(2)]]
    assert [[row[column] for column in V2_COLUMNS] for row in rows] == [
        [None, None, None],
        [None, None, None],
        ["n000042", {"Smiling": "true", "Eyeglasses": "false", "emotion": "happy, neutral"}, "dlib"],
    ]
    first = min(rows, key=lambda row: row["key"])
    assert [row["reject_reason"] for row in rows if row is not first] == ["duplicate", "duplicate"]
    assert first["status"] == "ok" and first["identity_cluster"] is not None


def test_the_manifest_embedding_space_is_the_one_space_of_the_scored_faces(tmp_path):
    assert scored_embedding_space(tmp_path) is None
    write_v1_shard(tmp_path, "000000", [full_record(0)])  # embedded before v2: space not recorded
    assert scored_embedding_space(tmp_path) is None
    for index, space in enumerate(("dlib", "dlib", "glintr100"), 1):
        with ShardWriter(tmp_path, f"{index:06d}", with_images=False) as writer:
            writer.add(dict(full_record(index), face_embedding_space=space))
            writer.commit()
    with pytest.raises(StepError, match=r"mix face embedding spaces \['dlib', 'glintr100'\]"):
        scored_embedding_space(tmp_path)
    (tmp_path / "000003_stats.json").unlink()
    assert scored_embedding_space(tmp_path) == "dlib"


def test_every_corpus_variant_gets_its_expected_decision(filtered_corpus):
    config, manifest = filtered_corpus
    out_dir = config.step_dir("filter")
    labels = {label.path: label.expect_filter for label in read_labels(config.ingest.source.path)}
    rows = DatasetIndex(out_dir).query(
        "SELECT source_path, coalesce(reject_reason, 'kept') AS outcome FROM samples ORDER BY source_path"
    )
    assert {row["source_path"]: row["outcome"] for row in rows} == labels
    assert manifest["counts"]["samples"] == 18 and manifest["status"] == "complete"
    assert manifest["embedding_space"] == "dlib"

    records = {record["source_path"]: record for record in read_records(out_dir)}
    kept = records["people/person_0.jpg"]
    assert len(kept["faces"]) == 1 and len(kept["face_embedding"]) == 128
    assert (
        kept["face_embedding_space"] == "dlib" and records["variants/cat.png"]["face_embedding_space"] is None
    )
    assert {"aesthetic", "nsfw", "watermark", "sharpness", "yaw", "face_area_ratio"} <= set(kept["scores"])
    assert kept["bucket_width"] % 64 == 0 and kept["bucket_height"] % 64 == 0
    assert kept["phash"] is not None and kept["identity_cluster"].startswith("sample-")
    assert kept["captions"] == {
        "original": "a smiling woman with long blond hair holding playing cards, portrait photo"
    }
    assert records["variants/two_people.jpg"]["scores"]["face_count"] == 2
    assert (
        records["variants/grayscale.jpg"]["identity_cluster"]
        == records["people/person_3.jpg"]["identity_cluster"]
    )

    samples = list(iter_samples(out_dir))
    assert sorted(sample.record["source_path"] for sample in samples) == sorted(
        path for path, outcome in labels.items() if outcome == "kept"
    )
    for sample in samples:
        assert sample.image == (config.ingest.source.path / sample.record["source_path"]).read_bytes()


def test_duplicates_and_held_out_identities_are_removed(local_ray, tmp_path):
    corpus = tmp_path / "corpus"
    build_sample_corpus(corpus)
    shutil.copy(corpus / "people/person_1.jpg", corpus / "people/person_1_copy.jpg")
    Image.open(corpus / "people/person_2.jpg").resize((360, 459)).save(
        corpus / "people/person_2_small.jpg", quality=80
    )
    held_out = tmp_path / "held_out" / "person_4"
    held_out.mkdir(parents=True)
    shutil.copy(corpus / "people/person_4.jpg", held_out / "reference.jpg")
    config = load_config(
        EMBEDDED,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"ingest.source.path={corpus}",
            f"filter.held_out_identities={held_out.parent}",
        ],
    )
    run_ingest(config)
    run_filter(config)
    outcome = {
        row["source_path"]: (row["reject_reason"], row["reject_detail"])
        for row in read_records(config.step_dir("filter"))
    }
    duplicates = {path for path, (reason, _) in outcome.items() if reason == "duplicate"}
    assert len(duplicates) == 2
    assert len(duplicates & {"people/person_1.jpg", "people/person_1_copy.jpg"}) == 1
    assert len(duplicates & {"people/person_2.jpg", "people/person_2_small.jpg"}) == 1
    assert outcome["people/person_4.jpg"][0] == "held_out_identity"
    assert outcome["variants/cmyk.jpg"][0] == "held_out_identity"
    assert outcome["people/person_3.jpg"][0] is None


@pytest.mark.slow
def test_killed_filter_job_resumes_to_the_same_rows(filtered_corpus, tmp_path):
    """The corpus's ingest output copied into a new run; its filter job SIGKILLed between shards, then
    rerun: the rows equal those of the uninterrupted run (same shard layout)."""
    reference, _ = filtered_corpus
    run_dir = tmp_path / "interrupted"
    shutil.copytree(reference.run.run_dir / "corpus", run_dir / "corpus")
    shutil.copytree(reference.step_dir("ingest"), run_dir / "ingest")
    overrides = [*corpus_overrides(run_dir), "filter.resources.concurrency=1"]
    interrupted = load_config(EMBEDDED, overrides)
    shards = 18 // CORPUS_SHARD_SIZE
    done_before_kill = kill_step_job_midway(
        "filter", EMBEDDED, overrides, interrupted.step_dir("filter") / SCORED, after=2
    )
    assert 2 <= done_before_kill < shards, "the kill should land mid-run"

    run_filter(interrupted)

    def rows(config):
        return sorted(read_records(config.step_dir("filter")), key=lambda record: record["key"])

    assert rows(interrupted) == rows(reference)


def test_real_photos_get_the_decisions_a_person_would_expect(
    local_ray, shared_faces, shared_portraits, tmp_path
):
    source = tmp_path / "photos"
    source.mkdir()
    expected = {
        "images__t1.jpg": "multiple_faces",
        "crop__no_face.png": "no_face",
        "bulk__view.jpg": "no_face",
        "bulk__pedestrian.png": "bad_image",  # an empty file
        "bulk__Rob_Lowe_0001.jpg": None,
        "bulk__Nathalie_Baye_0002.jpg": None,
    }
    for name in expected:
        shutil.copy(shared_faces / name, source / name)
    for name in ("man.jpg", "woman.jpg"):
        shutil.copy(shared_portraits / name, source / name)
        expected[name] = None
    config = load_config(
        EMBEDDED,
        [
            f"run.run_dir={tmp_path / 'run'}",
            "ingest.source.kind=folder",
            f"ingest.source.path={source}",
            "ingest.source.dataset=shared",
        ],
    )
    run_ingest(config)
    run_filter(config)
    outcome = {
        record["source_path"]: record["reject_reason"] for record in read_records(config.step_dir("filter"))
    }
    assert outcome == expected
