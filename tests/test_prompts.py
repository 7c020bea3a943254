"""The SPMS prompt sampler: determinism, gender conditioning, coverage, bank validation and fingerprint."""

from __future__ import annotations

import copy
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from scipy.stats import chi2

from datagen.prompts import (
    DEFAULT_BANK,
    Gender,
    PromptBank,
    PromptSampler,
    SampledPrompt,
    axis_distribution,
    gender_of,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_GENDER = 2000
CHI_SQUARE_TAIL = 1e-4
"""Chance that a truly uniform draw of the axis exceeds the bound. The draws are seeded, so the test is
deterministic; at 2000 draws the bound still fails a sampler that, e.g., draws one of 13 values twice as
often (that alone adds about 110 to the statistic, the bound is about 38 for 13 values)."""


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    return PromptBank.load()


@pytest.fixture(scope="module")
def samples(bank: PromptBank) -> dict[str, list[SampledPrompt]]:
    """2000 prompts per gender: 100 identities x 20 prompts each."""
    sampler = PromptSampler(bank, seed=7)
    keys = [f"celeba/{number:06d}" for number in range(100)]
    return {
        gender: [
            sampler.sample(key, index, None if gender == "unknown" else gender)
            for key in keys
            for index in range(SAMPLES_PER_GENDER // len(keys))
        ]
        for gender in ("male", "female", "unknown")
    }


def _bank_data() -> dict[str, Any]:
    """A small valid bank."""
    return {
        "version": 1,
        "template": "{style} of a {age} {subject} {expression}, wearing {clothing}",
        "subjects": {"male": "man", "female": "woman", "unknown": "person"},
        "axes": {
            "style": ["studio portrait", "film photograph"],
            "age": ["young", "elderly", "unique-looking"],
            "expression": ["smiling", "laughing"],
            "clothing": {"male": ["a tuxedo"], "female": ["an evening gown"], "any": ["a hoodie"]},
        },
    }


# --- the packaged bank ---------------------------------------------------------------------------------


def test_packaged_bank_is_next_to_the_module_and_rich(bank: PromptBank) -> None:
    assert DEFAULT_BANK.parent == PROJECT_ROOT / "datagen"
    assert bank.version == 1
    assert bank.subjects.model_dump() == {"male": "man", "female": "woman", "unknown": "person"}
    assert set(bank.axes) == {"style", "age", "expression", "clothing", "scene", "lighting", "shot"}
    for axis in ("style", "age", "expression", "lighting", "shot"):
        assert len(bank.choices(axis, "unknown")) >= 12, axis
    assert len(bank.choices("scene", "unknown")) >= 20
    clothing = bank.axes["clothing"]
    assert not isinstance(clothing, list)
    assert len(clothing.any) >= 12 and len(clothing.male) >= 10 and len(clothing.female) >= 10


def test_prompts_read_naturally(samples: dict[str, list[SampledPrompt]]) -> None:
    for prompt in (prompt for prompts in samples.values() for prompt in prompts):
        assert not re.search(r"\ba [aeiou]", prompt.text, re.IGNORECASE), prompt.text
        assert "{" not in prompt.text and "  " not in prompt.text and prompt.text == prompt.text.strip()
        assert all(value in prompt.text for value in prompt.axes.values() if not value.startswith("a "))
    elderly = next(prompt for prompt in samples["female"] if prompt.axes["age"] == "elderly")
    assert " an elderly woman " in elderly.text


# --- determinism -----------------------------------------------------------------------------------------


def test_same_inputs_give_the_same_prompt(bank: PromptBank) -> None:
    first, second = PromptSampler(bank, seed=3), PromptSampler(PromptBank.load(), seed=3)
    for index in range(20):
        assert first.sample("id-1", index, "female") == second.sample("id-1", index, "female")


def test_indices_keys_and_seeds_give_different_prompts(bank: PromptBank) -> None:
    sampler = PromptSampler(bank, seed=3)
    texts = [sampler.sample("id-1", index, "male").text for index in range(200)]
    assert len(set(texts)) == len(texts)
    assert sampler.sample("id-1", 0, "male") != sampler.sample("id-2", 0, "male")
    assert sampler.sample("id-1", 0, "male") != PromptSampler(bank, seed=4).sample("id-1", 0, "male")


def test_prompts_do_not_depend_on_call_order(bank: PromptBank) -> None:
    calls = [(f"id-{key}", index) for key in range(5) for index in range(10)]
    in_order = {call: PromptSampler(bank, seed=11).sample(*call, None) for call in calls}
    shuffled = list(calls)
    random.Random(0).shuffle(shuffled)
    sampler = PromptSampler(bank, seed=11)
    assert {call: sampler.sample(*call, None) for call in shuffled} == in_order


def test_prompts_are_the_same_in_another_process(bank: PromptBank) -> None:
    """No Python ``hash()``: another process with another hash seed draws the same prompt."""
    code = (
        "from datagen.prompts import PromptBank, PromptSampler;"
        "print(PromptSampler(PromptBank.load(), seed=5).sample('id-9', 3, 'female').text)"
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PromptSampler(bank, seed=5).sample("id-9", 3, "female").text


def test_sampling_algorithm_is_pinned() -> None:
    """A change of the draw (not of the bank) would change prompts behind an unchanged fingerprint."""
    sampler = PromptSampler(PromptBank.model_validate(_bank_data()), seed=0)
    texts = [sampler.sample("key", index, "male").text for index in range(3)]
    assert texts == [
        "film photograph of an elderly man smiling, wearing a tuxedo",
        "studio portrait of a young man smiling, wearing a hoodie",
        "film photograph of a young man smiling, wearing a tuxedo",
    ]


# --- gender conditioning --------------------------------------------------------------------------------


def test_male_prompts_use_man_and_never_female_clothing(
    bank: PromptBank, samples: dict[str, list[SampledPrompt]]
) -> None:
    clothing = bank.axes["clothing"]
    assert not isinstance(clothing, list)
    for prompt in samples["male"]:
        assert prompt.gender == "male"
        assert re.search(r"\bman\b", prompt.text) and not re.search(r"\b(woman|person)\b", prompt.text)
        assert prompt.axes["clothing"] in clothing.male + clothing.any
        assert not any(item in prompt.text for item in clothing.female)


def test_female_prompts_use_woman_and_never_male_clothing(
    bank: PromptBank, samples: dict[str, list[SampledPrompt]]
) -> None:
    clothing = bank.axes["clothing"]
    assert not isinstance(clothing, list)
    for prompt in samples["female"]:
        assert re.search(r"\bwoman\b", prompt.text) and not re.search(r"\b(man|person)\b", prompt.text)
        assert prompt.axes["clothing"] in clothing.female + clothing.any


def test_unknown_gender_uses_person_and_neutral_clothing_only(
    bank: PromptBank, samples: dict[str, list[SampledPrompt]]
) -> None:
    clothing = bank.axes["clothing"]
    assert not isinstance(clothing, list)
    for prompt in samples["unknown"]:
        assert prompt.gender == "unknown"
        assert re.search(r"\bperson\b", prompt.text) and not re.search(r"\b(man|woman)\b", prompt.text)
        assert prompt.axes["clothing"] in clothing.any
    sampler = PromptSampler(bank, seed=7)
    assert sampler.sample("id", 0, None) == sampler.sample("id", 0, "unknown")


def test_gender_changes_only_the_gendered_axes(bank: PromptBank) -> None:
    sampler = PromptSampler(bank, seed=1)
    for index in range(50):
        drawn = [sampler.sample("id", index, gender).axes for gender in ("male", "female", None)]
        for axis in ("style", "age", "expression", "scene", "lighting", "shot"):
            assert len({axes[axis] for axes in drawn}) == 1


@pytest.mark.parametrize("gender", ["M", "Male", "woman", ""])
def test_sample_rejects_gender_words(bank: PromptBank, gender: str) -> None:
    with pytest.raises(ValueError, match="gender must be 'male', 'female', 'unknown' or None"):
        PromptSampler(bank, seed=0).sample("id", 0, gender)


def test_seed_must_be_an_int(bank: PromptBank) -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        PromptSampler(bank, seed="7")  # type: ignore[arg-type]


# --- coverage ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gender", ["male", "female", "unknown"])
def test_every_value_is_drawn_about_uniformly(
    bank: PromptBank, samples: dict[str, list[SampledPrompt]], gender: Gender
) -> None:
    """Pearson's statistic over each axis' values stays under chi2(k - 1)'s upper 1e-4 quantile."""
    distribution = axis_distribution(prompt.axes for prompt in samples[gender])
    for axis in bank.axes:
        values = bank.choices(axis, gender)
        counts = distribution[axis]
        assert set(counts) == set(values), f"{axis}: {sorted(set(values) - set(counts))} never drawn"
        expected = len(samples[gender]) / len(values)
        statistic = sum((count - expected) ** 2 / expected for count in counts.values())
        bound = chi2.isf(CHI_SQUARE_TAIL, df=len(values) - 1)
        assert statistic < bound, f"{axis}: chi-square {statistic:.1f} >= {bound:.1f} ({counts})"


def test_axis_distribution_counts_per_axis_sorted(samples: dict[str, list[SampledPrompt]]) -> None:
    prompts = samples["male"][:300]
    distribution = axis_distribution(prompt.axes for prompt in prompts)
    assert list(distribution) == sorted(distribution)
    for axis, counts in distribution.items():
        assert list(counts) == sorted(counts)
        assert counts == dict(Counter(prompt.axes[axis] for prompt in prompts))
        assert sum(counts.values()) == len(prompts)
    assert axis_distribution([]) == {}


# --- gender_of -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "gender"),
    [
        ({"Male": "true"}, "male"),
        ({"Male": "1"}, "male"),
        ({"Male": "false"}, "female"),
        ({"Male": "-1"}, "female"),
        ({"male": " TRUE "}, "male"),
        ({"Male": "-1", "gender": "male"}, "female"),
        ({"Male": "maybe", "gender": "Female"}, "female"),
        ({"gender": "Man"}, "male"),
        ({"gender": "WOMAN"}, "female"),
        ({"Sex": "m"}, "male"),
        ({"sex": "F"}, "female"),
        ({"gender": "nonbinary"}, "unknown"),
        ({"Smiling": "true", "Young": "true"}, "unknown"),
        ({}, "unknown"),
        (None, "unknown"),
    ],
)
def test_gender_of(attributes: dict[str, str] | None, gender: str) -> None:
    assert gender_of(attributes) == gender


# --- bank validation ---------------------------------------------------------------------------------


def _changed(change: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(_bank_data())
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        target = data
        for part in parents:
            target = target[part]
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"template": "{style} of a {age} {subject} {expression} {mood}, wearing {clothing}"}, r"\{mood\}"),
        ({"axes.age": []}, "without values: age"),
        ({"axes.clothing.any": []}, r"without values: clothing\.any"),
        ({"axes.lighting": ["soft light"]}, "lighting never appear in the template"),
        ({"template": "{style:>3} of a {age} {subject} {expression}, wearing {clothing}"}, "plain axis name"),
        ({"template": "{style} of a {age} {subject} {expression}, wearing {clothing"}, "malformed"),
        ({"axes.style": ["film", "film"]}, r"style repeats \['film'\]"),
        ({"axes.clothing.male": ["a hoodie"]}, "as drawn for gender male"),
        ({"axes.age": ["young", " "]}, "age has a blank value"),
        ({"axes.subject": ["x"]}, "not an axis"),
        ({"version": "1"}, r"version\s+Input should be a valid integer"),
        ({"subjects.child": "kid"}, "Extra inputs are not permitted"),
        ({"prompts": []}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_banks_are_rejected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptBank.model_validate(_changed(change))


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump(_changed({"axes.age": []})))
    with pytest.raises(
        ValueError, match=rf"(?s)prompt bank {re.escape(str(path))} is invalid:.*without values: age"
    ):
        PromptBank.load(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping, got list"):
        PromptBank.load(path)
    path.write_text(yaml.safe_dump(_bank_data()))
    assert PromptBank.load(str(path)) == PromptBank.model_validate(_bank_data())


# --- fingerprint -----------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_short(bank: PromptBank) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", bank.fingerprint())
    assert PromptBank.load(DEFAULT_BANK).fingerprint() == bank.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2},
        {"template": "{style} of a {age} {subject} {expression} wearing {clothing}"},
        {"axes.age": ["young", "elderly", "unique-looking", "middle-aged"]},
        {"axes.age": ["elderly", "young", "unique-looking"]},
        {"axes.clothing.female": ["a sundress"]},
        {"subjects.unknown": "individual"},
    ],
)
def test_fingerprint_changes_with_the_bank(change: dict[str, Any]) -> None:
    original = PromptBank.model_validate(_bank_data()).fingerprint()
    assert PromptBank.model_validate(_changed(change)).fingerprint() != original
