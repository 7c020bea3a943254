"""The evaluation benchmark: prompts tagged with gender and axes, identities, and their pairing.

``benchmark.yaml`` next to this module is the versioned definition (200 prompts, the reference identity
setup, the seed rule; its header comment has the arithmetic). Identities come from a folder holding an
``identities.yaml`` manifest::

    identities:
      - {name: id01, gender: man, photo: id01.jpg}      # photo: relative to the folder
      - {name: id02, gender: woman, photo: faces/b.png}
      - {name: id03, photo: c.jpg}                       # gender left out: unknown

or, in the embedded profile, from the sample corpus's portraits (:func:`sample_corpus_identities`).
:func:`pairs` pairs each identity with the prompts of its gender and the gender-neutral ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infu.config import load_yaml_model
from infu.draws import draw_seed
from infu.identities import Identity, IdentityGender, check_identities, check_unique_names
from infu.sample_corpus import read_labels

DEFAULT_BENCHMARK = Path(__file__).with_name("benchmark.yaml")
"""The packaged benchmark definition."""
SEED_NAMESPACE = "infu-eval"
"""First part of every per-image seed (see :meth:`Benchmark.seed`)."""

PromptGender = Literal["man", "woman", "any"]
PROMPT_GENDERS: dict[IdentityGender, tuple[PromptGender, ...]] = {
    "man": ("man", "any"),
    "woman": ("woman", "any"),
    "unknown": ("any",),
}
"""The pairing rule: the prompt tags each identity gender is paired with."""
SUBJECT_WORDS: dict[PromptGender, str] = {"man": "man", "woman": "woman", "any": "person"}
"""The subject noun a prompt of each tag names (and the only one of the three it names)."""
SUBJECT_PATTERN = re.compile(r"\b(man|woman|person)\b", re.IGNORECASE)
SHORT_MAX_WORDS = 10
MEDIUM_MAX_WORDS = 24
"""``length`` axis: short up to 10 words, medium 11 to 24, long 25 or more."""

SAMPLE_CORPUS_GENDERS: dict[str, IdentityGender] = {
    "person_0": "woman",
    "person_1": "woman",
    "person_2": "man",
    "person_3": "man",
    "person_4": "man",
    "person_5": "woman",
    "astronaut": "woman",
}
"""Genders of the sample corpus's portrait identities, which its labels do not state, as the photos show
them (insightface's group photo, left to right; scikit-image's astronaut is Eileen Collins), as the
corpus's ``original`` captions describe them. A portrait identity missing here is of unknown gender."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Axes(_Strict):
    """Where a prompt lies on the paper's axes."""

    length: Literal["short", "medium", "long"]
    face_size: Literal["close_up", "half_body", "full_body"]
    view: Literal["front", "three_quarter", "profile"]
    scene: Literal["plain", "indoor", "urban", "nature", "fantasy"]
    age: Literal["unspecified", "young", "middle_aged", "elderly"]
    style: Literal["photo", "painting", "illustration", "anime", "render", "sketch"]
    complexity: Literal["simple", "moderate", "complex"]


class Prompt(_Strict):
    """One benchmark prompt: its text names exactly the subject of its gender tag."""

    text: str = Field(min_length=1)
    gender: PromptGender
    axes: Axes

    @model_validator(mode="after")
    def _text_fits_tags(self) -> Prompt:
        if self.text != self.text.strip():
            raise ValueError(f"prompt {self.text!r} has leading or trailing spaces")
        named = {word.lower() for word in SUBJECT_PATTERN.findall(self.text)}
        expected = SUBJECT_WORDS[self.gender]
        if named != {expected}:
            raise ValueError(
                f"prompt {self.text!r} is tagged {self.gender}: it must name '{expected}' and none of "
                f"{sorted(set(SUBJECT_WORDS.values()) - {expected})} (names {sorted(named) or 'none'})"
            )
        if self.axes.length != length_of(self.text):
            raise ValueError(
                f"prompt {self.text!r} has {len(self.text.split())} words: its length is "
                f"{length_of(self.text)}, not {self.axes.length}"
            )
        return self

    @property
    def id(self) -> str:
        """Stable id from the text alone (order-independent): ``p`` + 10 hex digits of its SHA-256."""
        return "p" + hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:10]


class GenderCounts(_Strict):
    """How many prompts each gender tag has."""

    man: int = Field(ge=0)
    woman: int = Field(ge=0)
    any: int = Field(ge=0)


class IdentityCounts(_Strict):
    man: int = Field(ge=0)
    woman: int = Field(ge=0)


class ReferenceSetup(_Strict):
    """The identity setup the benchmark is built for and the pair count it gives."""

    identities: IdentityCounts
    pairs: int = Field(ge=1)


class SeedRule(_Strict):
    base: int = Field(ge=0)
    per_pair: int = Field(ge=1, description="images (seeds) per identity-prompt pair")


class Benchmark(_Strict):
    """A versioned benchmark: prompts, declared counts, the reference setup and the seed rule."""

    version: int = Field(ge=1)
    counts: GenderCounts
    reference: ReferenceSetup
    seeds: SeedRule
    prompts: list[Prompt] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Benchmark:
        normalized = Counter(" ".join(prompt.text.lower().split()) for prompt in self.prompts)
        repeated = sorted(text for text, count in normalized.items() if count > 1)
        if repeated:
            raise ValueError(f"duplicate prompts (ignoring case and spacing): {repeated}")
        tags: Counter[str] = Counter(prompt.gender for prompt in self.prompts)
        declared = self.counts.model_dump()
        found = {tag: tags.get(tag, 0) for tag in declared}
        if found != declared:
            raise ValueError(f"counts declares {declared} prompts per gender tag, the prompts have {found}")
        men, women = self.reference.identities.man, self.reference.identities.woman
        man: list[IdentityGender] = ["man"]
        woman: list[IdentityGender] = ["woman"]
        count = self.pair_count(man * men + woman * women)
        if count != self.reference.pairs:
            raise ValueError(
                f"reference.pairs is {self.reference.pairs}, but {men} men and {women} women pair with "
                f"{count} prompts"
            )
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> Benchmark:
        """The benchmark in ``path`` (default: the packaged ``benchmark.yaml``); errors name the file."""
        return load_yaml_model(cls, Path(path) if path is not None else DEFAULT_BENCHMARK, "benchmark")

    def fingerprint(self) -> str:
        """Short SHA-256 of the canonical content: any change of the definition changes it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def prompts_for(self, gender: IdentityGender) -> list[Prompt]:
        """The prompts an identity of ``gender`` is paired with, in file order."""
        return [prompt for prompt in self.prompts if prompt.gender in PROMPT_GENDERS[gender]]

    def pair_count(self, genders: list[IdentityGender]) -> int:
        """Pairs for identities of these genders: the sum of their matching prompt counts."""
        per_gender = {gender: len(self.prompts_for(gender)) for gender in PROMPT_GENDERS}
        return sum(per_gender[gender] for gender in genders)

    def seed(self, identity: str, prompt_id: str, index: int) -> int:
        """The seed of image ``index`` of the pair (``identity``, ``prompt_id``)."""
        return draw_seed(SEED_NAMESPACE, self.seeds.base, identity, prompt_id, index)


def length_of(text: str) -> Literal["short", "medium", "long"]:
    """The ``length`` axis value of a prompt text, from its word count."""
    words = len(text.split())
    if words <= SHORT_MAX_WORDS:
        return "short"
    return "medium" if words <= MEDIUM_MAX_WORDS else "long"


def sample_corpus_identities(corpus: str | Path) -> list[Identity]:
    """The embedded profile's identities: one per portrait of the sample corpus built in ``corpus``
    (``infu.sample_corpus``), genders from :data:`SAMPLE_CORPUS_GENDERS`."""
    corpus = Path(corpus)
    identities = [
        Identity(
            name=label.identity,
            gender=SAMPLE_CORPUS_GENDERS.get(label.identity, "unknown"),
            photo=(corpus / label.path).resolve(),
        )
        for label in read_labels(corpus)
        if label.variant == "portrait" and label.identity is not None
    ]
    if not identities:
        raise ValueError(f"sample corpus {corpus} has no portraits")
    check_identities(identities, f"sample corpus {corpus}")
    return identities


@dataclass(frozen=True)
class Pair:
    """An identity with one prompt it is paired with, and the seed of each image to make."""

    identity: Identity
    prompt: Prompt
    seeds: tuple[int, ...]

    @property
    def id(self) -> str:
        """Stable id: ``<identity name>/<prompt id>``."""
        return f"{self.identity.name}/{self.prompt.id}"


def pairs(benchmark: Benchmark, identities: list[Identity]) -> list[Pair]:
    """Every identity with every prompt its gender pairs with (identity order, then prompt order)."""
    check_unique_names(identities, "pairs")
    return [
        Pair(
            identity=identity,
            prompt=prompt,
            seeds=tuple(
                benchmark.seed(identity.name, prompt.id, index) for index in range(benchmark.seeds.per_pair)
            ),
        )
        for identity in identities
        for prompt in benchmark.prompts_for(identity.gender)
    ]
