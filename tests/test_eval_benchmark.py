"""The evaluation benchmark: the packaged definition, validation, identities, the pairing rule, seeds."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from eval.benchmark import (
    DEFAULT_BENCHMARK,
    SAMPLE_CORPUS_GENDERS,
    Axes,
    Benchmark,
    pairs,
    sample_corpus_identities,
)
from infu.draws import draw_seed
from infu.identities import IDENTITY_MANIFEST, Identity, IdentityGender, folder_identities, identity_photos
from infu.sample_corpus import build_sample_corpus

MIN_AXIS_VALUE_PER_GENDER = 3
"""Every axis value appears in at least this many man prompts and this many woman prompts."""


@pytest.fixture(scope="module")
def benchmark() -> Benchmark:
    return Benchmark.load()


@pytest.fixture
def raw() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_BENCHMARK.read_text())


def _identity_folder(folder: Path, genders: list[IdentityGender]) -> Path:
    """A folder of small photos with a manifest naming one identity per gender given."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, gender in enumerate(genders):
        Image.new("RGB", (16, 16), (index * 10, 0, 0)).save(folder / f"id{index:02d}.png")
        entry = {"name": f"id{index:02d}", "photo": f"id{index:02d}.png"}
        if gender != "unknown":
            entry["gender"] = gender
        entries.append(entry)
    (folder / IDENTITY_MANIFEST).write_text(yaml.safe_dump({"identities": entries}))
    return folder


def test_packaged_benchmark_has_200_tagged_prompts(benchmark):
    assert benchmark.version == 1
    assert len(benchmark.prompts) == 200
    assert Counter(prompt.gender for prompt in benchmark.prompts) == {"man": 89, "woman": 110, "any": 1}
    assert len({prompt.id for prompt in benchmark.prompts}) == 200
    assert len(benchmark.fingerprint()) == 16


def test_every_axis_value_is_covered_for_both_genders(benchmark):
    for axis, field in Axes.model_fields.items():
        values = set(field.annotation.__args__)  # the axis's Literal values
        for gender in ("man", "woman"):
            counts = Counter(getattr(p.axes, axis) for p in benchmark.prompts if p.gender == gender)
            assert set(counts) == values, (axis, gender)
            assert min(counts.values()) >= MIN_AXIS_VALUE_PER_GENDER, (axis, gender, counts)


def test_reference_setup_of_15_identities_gives_1497_pairs(benchmark, tmp_path):
    genders: list[IdentityGender] = ["man"] * 8 + ["woman"] * 7
    identities = folder_identities(_identity_folder(tmp_path, genders))
    made = pairs(benchmark, identities)
    expected = sum(
        sum(prompt.gender in (identity.gender, "any") for prompt in benchmark.prompts)
        for identity in identities
    )
    assert len(made) == expected == benchmark.reference.pairs == 1497


@pytest.mark.parametrize(
    "genders",
    [["man"] * 15, ["woman"] * 15, ["man"] * 5 + ["woman"] * 7 + ["unknown"] * 3],
    ids=["men", "women", "mixed"],
)
def test_pair_count_is_the_sum_of_matching_prompts(benchmark, tmp_path, genders):
    identities = folder_identities(_identity_folder(tmp_path, genders))
    per_gender = {"man": 90, "woman": 111, "unknown": 1}
    assert len(pairs(benchmark, identities)) == sum(per_gender[g] for g in genders)
    assert benchmark.pair_count(genders) == sum(per_gender[g] for g in genders)


def test_pairing_rule_matches_gender_tags(benchmark, tmp_path):
    identities = folder_identities(_identity_folder(tmp_path, ["man", "woman", "unknown"]))
    tags = {
        identity.name: Counter(pair.prompt.gender for pair in pairs(benchmark, [identity]))
        for identity in identities
    }
    assert tags == {
        "id00": {"man": 89, "any": 1},
        "id01": {"woman": 110, "any": 1},
        "id02": {"any": 1},
    }


def test_pair_ids_and_seeds_are_stable_unique_and_order_free(benchmark, raw, tmp_path):
    identities = folder_identities(_identity_folder(tmp_path, ["man", "woman"]))
    made = pairs(benchmark, identities)
    assert len({pair.id for pair in made}) == len(made)
    assert len({seed for pair in made for seed in pair.seeds}) == len(made)
    first = made[0]
    assert first.id == f"id00/{first.prompt.id}"
    assert first.seeds == (draw_seed("infu-eval", 0, "id00", first.prompt.id, 0),)

    raw["prompts"].reverse()
    raw["seeds"]["per_pair"] = 2
    reordered = {pair.id: pair.seeds for pair in pairs(Benchmark.model_validate(raw), identities)}
    assert set(reordered) == {pair.id for pair in made}
    assert all(reordered[pair.id][:1] == pair.seeds for pair in made)
    assert all(len(set(seeds)) == 2 for seeds in reordered.values())


def test_fingerprint_follows_content_not_formatting(benchmark, raw, tmp_path):
    reformatted = tmp_path / "benchmark.yaml"
    reformatted.write_text(yaml.safe_dump(raw, width=60))
    assert Benchmark.load(reformatted).fingerprint() == benchmark.fingerprint()
    raw["seeds"]["base"] = 1
    assert Benchmark.model_validate(raw).fingerprint() != benchmark.fingerprint()


def _replace_prompt(raw: dict[str, Any], index: int, **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    changed["prompts"][index] = {**changed["prompts"][index], **changes}
    return changed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: _replace_prompt(raw, 1, text=raw["prompts"][0]["text"].upper()), "duplicate prompts"),
        (lambda raw: _replace_prompt(raw, 0, gender="male"), "gender"),
        (lambda raw: _replace_prompt(raw, 0, gender="woman"), "tagged woman: it must name 'woman'"),
        (lambda raw: _replace_prompt(raw, 0, text="a woman, close-up portrait"), "tagged man"),
        (lambda raw: _replace_prompt(raw, 0, text="a man and a person, close-up"), "names ['man', 'person']"),
        (lambda raw: _replace_prompt(raw, 0, axes={**raw["prompts"][0]["axes"], "view": "back"}), "view"),
        (lambda raw: _replace_prompt(raw, 0, axes={**raw["prompts"][0]["axes"], "length": "long"}), "words"),
        (lambda raw: _replace_prompt(raw, 0, mood="happy"), "mood"),
        (lambda raw: {**raw, "counts": {"man": 90, "woman": 109, "any": 1}}, "counts declares"),
        (lambda raw: {**raw, "reference": {**raw["reference"], "pairs": 1500}}, "reference.pairs is 1500"),
    ],
    ids=[
        "duplicate",
        "bad-tag",
        "tag-not-named",
        "text-names-other-gender",
        "two-subjects",
        "bad-axis-value",
        "length-mismatch",
        "unknown-key",
        "count-mismatch",
        "reference-mismatch",
    ],
)
def test_invalid_benchmarks_fail_with_clear_errors(raw, tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change(raw)))
    with pytest.raises(ValueError, match="is invalid") as error:
        Benchmark.load(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_identity_folder_manifest(tmp_path):
    folder = _identity_folder(tmp_path / "ids", ["man", "unknown"])
    identities = folder_identities(folder)
    assert identities == [
        Identity(name="id00", gender="man", photo=(folder / "id00.png").resolve()),
        Identity(name="id01", gender="unknown", photo=(folder / "id01.png").resolve()),
    ]

    (folder / "id01.png").unlink()
    with pytest.raises(FileNotFoundError, match="id01.png"):
        folder_identities(folder)
    manifest = {"identities": [{"name": "a", "photo": "id00.png"}, {"name": "a", "photo": "id00.png"}]}
    (folder / IDENTITY_MANIFEST).write_text(yaml.safe_dump(manifest))
    with pytest.raises(ValueError, match="repeat"):
        folder_identities(folder)
    (folder / IDENTITY_MANIFEST).write_text(yaml.safe_dump({"identities": [{"name": "a b", "photo": "x"}]}))
    with pytest.raises(ValueError, match="is invalid"):
        folder_identities(folder)
    with pytest.raises(FileNotFoundError, match=IDENTITY_MANIFEST):
        folder_identities(tmp_path)


def test_sample_corpus_identities_for_the_embedded_profile(benchmark, tmp_path):
    try:
        build_sample_corpus(tmp_path)
    except FileNotFoundError as error:
        pytest.skip(f"sample-corpus photos are not installed: {error}")
    identities = sample_corpus_identities(tmp_path)
    assert {identity.name: identity.gender for identity in identities} == SAMPLE_CORPUS_GENDERS
    assert all(identity.photo.is_file() for identity in identities)
    assert len(pairs(benchmark, identities)) == 3 * (89 + 1) + 4 * (110 + 1)


def test_an_identity_folder_names_the_photos_the_filter_holds_out_in_either_layout(tmp_path):
    manifest = _identity_folder(tmp_path / "benchmark", ["man", "woman"])
    photos = identity_photos(manifest)
    assert {name: [path.name for path in paths] for name, paths in photos.items()} == {
        identity.name: [identity.photo.name] for identity in folder_identities(manifest)
    }
    people = tmp_path / "people"
    for name, files in {"ann": ["a.jpg", "b.png"], "bob": ["c.webp"]}.items():
        (people / name).mkdir(parents=True)
        for file in files:
            (people / name / file).write_bytes(b"")
    (people / "ann" / "notes.txt").write_text("not a photo")
    assert {name: [path.name for path in paths] for name, paths in identity_photos(people).items()} == {
        "ann": ["a.jpg", "b.png"],
        "bob": ["c.webp"],
    }
