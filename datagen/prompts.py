"""The prompt sampler of SPMS synthesis: diverse, gender-aware prompts for each real identity.

A :class:`PromptBank` (``prompt_bank.yaml`` next to this module by default) holds a template and its
axes (style, age, expression, clothing, scene, lighting, shot); a :class:`PromptSampler` fills the
template with one uniformly drawn value per axis. A prompt depends only on (seed, key, index): each
draw has its own generator, seeded by :func:`infu.draws.draw_seed` of those three, so prompts are the
same in every process, worker and call order.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from infu.config import load_yaml_model
from infu.draws import draw_seed

DEFAULT_BANK = Path(__file__).with_name("prompt_bank.yaml")
"""The packaged prompt bank."""
Gender = Literal["male", "female", "unknown"]
GENDERS: tuple[Gender, ...] = ("male", "female", "unknown")
SUBJECT_PLACEHOLDER = "subject"
"""The template placeholder filled with the gender's noun rather than an axis value."""

MALE_FLAGS: dict[str, Gender] = {
    "true": "male",
    "1": "male",
    "false": "female",
    "-1": "female",
    "0": "female",
}
"""CelebA ``Male`` values (its CSV's 1/-1, or booleans) -> gender."""
GENDER_ATTRIBUTES = ("gender", "sex")
GENDER_WORDS: dict[str, Gender] = {
    "male": "male",
    "man": "male",
    "m": "male",
    "female": "female",
    "woman": "female",
    "f": "female",
}
"""Values of a ``gender``/``sex`` attribute -> gender; any other value says nothing."""
ARTICLE_BEFORE_VOWEL = re.compile(r"\b(a) (?=[aeiou])(?!eu|uni|use|usu|one|once)", re.IGNORECASE)
"""An "a" before a vowel sound, which is written "an" (words like "unique" or "European" keep "a")."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GenderedValues(_Strict):
    """Values of an axis that depends on gender: an identity draws from ``any`` plus its gender's."""

    male: list[str]
    female: list[str]
    any: list[str]


class Subjects(_Strict):
    """The subject noun of each gender."""

    male: str
    female: str
    unknown: str


class PromptBank(_Strict):
    """A versioned template and its axes; every placeholder is an axis (or ``subject``), no axis is empty."""

    version: int
    template: str
    subjects: Subjects
    axes: dict[str, list[str] | GenderedValues]

    @model_validator(mode="after")
    def _template_and_axes_agree(self) -> PromptBank:
        placeholders = template_placeholders(self.template)
        if SUBJECT_PLACEHOLDER in self.axes:
            raise ValueError(f"`{SUBJECT_PLACEHOLDER}` is the gender's noun, not an axis: rename that axis")
        unknown = sorted(set(placeholders) - set(self.axes) - {SUBJECT_PLACEHOLDER})
        if unknown:
            raise ValueError(
                f"template placeholder(s) {', '.join('{' + name + '}' for name in unknown)} are no axis "
                f"(axes: {', '.join(sorted(self.axes))})"
            )
        unused = sorted(set(self.axes) - set(placeholders))
        if unused:
            raise ValueError(f"axis(es) {', '.join(unused)} never appear in the template {self.template!r}")
        empty = _empty_axes(self.axes)
        if empty:
            raise ValueError(f"axis(es) without values: {', '.join(empty)}")
        for axis, values in self.axes.items():
            if isinstance(values, list):
                _check_values(axis, values)
            else:
                for gender in GENDERS:
                    _check_values(f"{axis} (as drawn for gender {gender})", self.choices(axis, gender))
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptBank:
        """The bank in ``path`` (default: the packaged ``prompt_bank.yaml``); errors name the file."""
        return load_yaml_model(cls, Path(path) if path is not None else DEFAULT_BANK, "prompt bank")

    def choices(self, axis: str, gender: Gender) -> list[str]:
        """The values ``axis`` draws from for ``gender`` (a gendered axis: ``any`` plus the gender's)."""
        values = self.axes[axis]
        if isinstance(values, list):
            return values
        return values.any + (getattr(values, gender) if gender != "unknown" else [])

    def fingerprint(self) -> str:
        """Short SHA-256 of the canonical content: any change of the bank changes it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def template_placeholders(template: str) -> list[str]:
    """The named ``{placeholders}`` of ``template``, in order; positional, indexed or formatted fields
    (``{}``, ``{0}``, ``{a.b}``, ``{a:>3}``) are errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template {template!r} is malformed: {error}") from error
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"template field {{{field}}} must be a plain axis name like {{scene}}")
        fields.append(field)
    return fields


def _check_values(axis: str, values: list[str]) -> None:
    """No blank value, no value twice (a repeat would be drawn twice as often)."""
    if any(not value.strip() for value in values):
        raise ValueError(f"axis {axis} has a blank value")
    repeated = sorted(value for value, count in Counter(values).items() if count > 1)
    if repeated:
        raise ValueError(f"axis {axis} repeats {repeated}: a repeated value is drawn more often")


def _empty_axes(axes: dict[str, list[str] | GenderedValues]) -> list[str]:
    """The axes (``axis.gender`` for a gendered one) without values."""
    empty: list[str] = []
    for axis, values in axes.items():
        if isinstance(values, list):
            empty += [axis] if not values else []
        else:
            empty += [
                f"{axis}.{gender}" for gender in ("male", "female", "any") if not getattr(values, gender)
            ]
    return empty


@dataclass(frozen=True)
class SampledPrompt:
    """A rendered prompt, the value drawn for each axis, and the gender it was drawn for."""

    text: str
    axes: dict[str, str]
    gender: Gender


class PromptSampler:
    """Draws prompts from ``bank``; a prompt depends only on (``seed``, key, index) and the gender."""

    def __init__(self, bank: PromptBank, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.bank = bank
        self.seed = seed

    def sample(self, key: str, index: int, gender: str | None) -> SampledPrompt:
        """Prompt ``index`` of identity ``key``; ``gender`` picks the noun and the gendered values
        (None or "unknown": "person" and gender-neutral values only).

        Axes are drawn in sorted order, one draw each, so the gender changes only the gendered axes.
        """
        resolved = _resolve_gender(gender)
        generator = np.random.default_rng(draw_seed(self.seed, key, index, "prompt"))
        chosen: dict[str, str] = {}
        for axis in sorted(self.bank.axes):
            values = self.bank.choices(axis, resolved)
            chosen[axis] = values[int(generator.integers(len(values)))]
        subject = getattr(self.bank.subjects, resolved)
        text = self.bank.template.format_map({**chosen, SUBJECT_PLACEHOLDER: subject})
        return SampledPrompt(text=_with_articles(text), axes=chosen, gender=resolved)


def _resolve_gender(gender: str | None) -> Gender:
    if gender is None or gender == "unknown":
        return "unknown"
    if gender == "male":
        return "male"
    if gender == "female":
        return "female"
    raise ValueError(f"gender must be 'male', 'female', 'unknown' or None, got {gender!r} (see gender_of)")


def _with_articles(text: str) -> str:
    """``text`` with "a" written "an" before a vowel sound, and runs of spaces collapsed."""
    return re.sub(r" {2,}", " ", ARTICLE_BEFORE_VOWEL.sub(lambda match: match.group(1) + "n ", text)).strip()


def gender_of(attributes: dict[str, str] | None) -> Gender:
    """The gender in dataset attributes (CelebA's ``Male``, else ``gender``/``sex``): male, female, unknown.

    Attribute names and values match whatever their case; unrecognised values say nothing.
    """
    if not attributes:
        return "unknown"
    by_name = {name.strip().lower(): str(value).strip().lower() for name, value in attributes.items()}
    from_flag = MALE_FLAGS.get(by_name.get("male", ""))
    if from_flag is not None:
        return from_flag
    for name in GENDER_ATTRIBUTES:
        from_word = GENDER_WORDS.get(by_name.get(name, ""))
        if from_word is not None:
            return from_word
    return "unknown"


def axis_distribution(drawn: Iterable[Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """How often each value of each axis was drawn (``drawn``: the prompts' ``axes``): axis -> value ->
    count, both sorted."""
    counts: dict[str, Counter[str]] = {}
    for axes in drawn:
        for axis, value in axes.items():
            counts.setdefault(axis, Counter())[value] += 1
    return {axis: dict(sorted(counts[axis].items())) for axis in sorted(counts)}
