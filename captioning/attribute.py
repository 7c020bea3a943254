"""The ``attribute`` caption source: one short sentence from the face stack and the dataset's attributes.

"a close-up photo of a smiling young woman with eyeglasses, facing the camera": framing from the
largest face's share of the image, the subject from the dataset's labels (CelebA-style booleans
``"true"``/``"false"``, CelebV-HQ's positive labels and emotion, a ``gender``/``sex``/``person_type``
or ``age`` value), head pose from the largest face. What the record does not say is left out, so a
record without faces or attributes reads "a photo of a person". Attribute names match whatever their
case and separators ("Blond_Hair", "blonde_hair", "blond hair").
"""

from __future__ import annotations

import math
import re
from typing import Any

from infu.draws import stable_uniform

FRAMINGS = ((0.15, "close-up"), (0.05, "portrait"), (0.015, "half-length"))
"""(least share of the image the largest face covers, framing word), widest face first."""
TURN_DEGREES = 20.0
"""``|yaw|`` from which the head is "turned"."""
NOD_DEGREES = 15.0
"""``|pitch|`` from which the head is "looking up/down"."""

EXPRESSIONS = {"laugh": "laughing", "smiling": "smiling", "smile": "smiling"}
"""Expression labels (CelebA ``Smiling``, CelebV-HQ actions) -> adjective; the first one set wins."""
EMOTIONS = {
    "happy": "happy",
    "sad": "sad",
    "anger": "angry",
    "angry": "angry",
    "fear": "fearful",
    "surprise": "surprised",
    "surprised": "surprised",
    "disgust": "disgusted",
    "contempt": "contemptuous",
}
"""CelebV-HQ ``emotion`` -> adjective, used when no expression label is set; ``neutral`` becomes "with a
neutral expression". Several emotions (a clip's timed segments) say nothing about one frame: ignored."""
HAIR_COLOURS = {"black_hair": "black", "blond_hair": "blond", "brown_hair": "brown", "gray_hair": "gray"}
WITH_ITEMS = {"eyeglasses": "eyeglasses", "sunglasses": "sunglasses", "mustache": "a mustache"}
WEARING_ITEMS = {
    "wearing_hat": "a hat",
    "wearing_lipstick": "lipstick",
    "wearing_earrings": "earrings",
    "wearing_necklace": "a necklace",
    "wearing_necktie": "a necktie",
    "wearing_mask": "a mask",
}
GENDER_NAMES = ("gender", "sex", "person_type")
GENDER_VALUES = {"male": True, "man": True, "m": True, "female": False, "woman": False, "f": False}
"""Values of a gender attribute -> male; other values (CosmicManHQ's ``person_type`` may be anything)
are ignored."""
AGE_WORDS = {"child": "child", "kid": "child", "teen": "child", "teenager": "child", "young": "young"}
AGE_WORDS |= {"old": "elderly", "elderly": "elderly", "senior": "elderly"}
NOUNS = {(True, False): "man", (False, False): "woman", (True, True): "boy", (False, True): "girl"}
"""(male, child) -> noun; an unknown gender is a "person" (or a "child")."""


def _name(attribute: str) -> str:
    """An attribute name in lookup form: lowercase, words joined by "_", "blonde" spelled "blond"."""
    return re.sub(r"[^a-z0-9]+", "_", attribute.lower()).strip("_").replace("blonde", "blond")


def _flag(attributes: dict[str, str], name: str) -> bool | None:
    """A boolean label: True for "true", False for "false", None when absent or not a boolean."""
    return {"true": True, "false": False}.get(attributes.get(name, "").strip().lower())


def _age(attributes: dict[str, str]) -> str | None:
    """The age group ("child", "young", "elderly") from an ``age`` value (years or a word), else from
    ``Young``; None when unknown or in between."""
    value = attributes.get("age", "").strip().lower()
    if value.replace(".", "", 1).isdigit():
        years = float(value)
        return "child" if years < 18 else "young" if years < 36 else "elderly" if years >= 60 else None
    if value in AGE_WORDS:
        return AGE_WORDS[value]
    return "young" if _flag(attributes, "young") else None


def _male(attributes: dict[str, str]) -> bool | None:
    """From ``Male``, else a gender attribute; None when unknown."""
    male = _flag(attributes, "male")
    if male is not None:
        return male
    values = (attributes.get(name, "").strip().lower() for name in GENDER_NAMES)
    return next((GENDER_VALUES[value] for value in values if value in GENDER_VALUES), None)


def _emotion(attributes: dict[str, str]) -> str:
    return attributes.get("emotion", "").strip().lower()


def _expression(attributes: dict[str, str]) -> str | None:
    """The expression adjective: from an expression label, else from a single non-neutral emotion."""
    labelled = next((word for name, word in EXPRESSIONS.items() if _flag(attributes, name)), None)
    return labelled or EMOTIONS.get(_emotion(attributes))


def _person(attributes: dict[str, str]) -> str:
    """The person with an article, e.g. "a smiling young bald man": expression, age, baldness, noun."""
    age = _age(attributes)
    male = _male(attributes)
    if male is None:
        noun = "child" if age == "child" else "person"
    else:
        noun = NOUNS[(male, age == "child")]
    words = [
        _expression(attributes),
        None if age == "child" else age,
        "bald" if _flag(attributes, "bald") else None,
    ]
    return _with_article(" ".join(word for word in [*words, noun] if word))


def _features(attributes: dict[str, str]) -> list[str]:
    """What the person is "with": hair colour, a neutral expression, glasses, facial hair."""
    features = []
    hair = next((colour for name, colour in HAIR_COLOURS.items() if _flag(attributes, name)), None)
    if hair and not _flag(attributes, "bald"):
        features.append(f"{hair} hair")
    if _emotion(attributes) == "neutral" and _expression(attributes) is None:
        features.append("a neutral expression")
    features += [item for name, item in WITH_ITEMS.items() if _flag(attributes, name)]
    if _flag(attributes, "goatee"):
        features.append("a goatee")
    elif _flag(attributes, "no_beard") is False or _flag(attributes, "beard"):
        features.append("a beard")
    return features


def _subject(attributes: dict[str, str]) -> str:
    """The subject as much as is known, e.g. "a smiling young woman with blond hair and eyeglasses
    wearing a hat"."""
    subject = _person(attributes)
    features = _features(attributes)
    if features:
        subject += " with " + _listed(features)
    wearing = [item for name, item in WEARING_ITEMS.items() if _flag(attributes, name)]
    if wearing:
        subject += " wearing " + _listed(wearing)
    return subject


def _face_share(record: dict[str, Any]) -> float | None:
    """The largest face's share of the image: ``scores["face_area_ratio"]``, else its bbox."""
    ratio = (record.get("scores") or {}).get("face_area_ratio")
    if ratio is not None:
        return float(ratio)
    faces, width, height = record.get("faces"), record.get("width"), record.get("height")
    if not faces or not width or not height:
        return None
    x1, y1, x2, y2 = faces[0]["bbox"]
    return max(x2 - x1, 0) * max(y2 - y1, 0) / (width * height)


def _framing(record: dict[str, Any]) -> str | None:
    share = _face_share(record)
    if share is None:
        return None
    return next((word for least, word in FRAMINGS if share >= least), None)


def _angle(record: dict[str, Any], name: str) -> float | None:
    """``yaw`` or ``pitch`` of the largest face, else from the record's scores; None when unknown."""
    faces = record.get("faces") or [{}]
    value = faces[0].get(name)
    if value is None:
        value = (record.get("scores") or {}).get(name)
    return None if value is None or math.isnan(value) else float(value)


def _pose(record: dict[str, Any]) -> str | None:
    """The head pose ("facing the camera", "turned to the left", "looking up"...), None when unknown.

    ``yaw`` > 0 means the nose points to the image's right (infu.face.base.HeadPose), so "turned to the
    right" is toward the image's (the viewer's) right; ``pitch`` > 0 is looking up."""
    yaw, pitch = _angle(record, "yaw"), _angle(record, "pitch")
    if yaw is None and pitch is None:
        return None
    parts = []
    if yaw is not None and abs(yaw) >= TURN_DEGREES:
        parts.append("turned to the right" if yaw > 0 else "turned to the left")
    if pitch is not None and abs(pitch) >= NOD_DEGREES:
        parts.append("looking up" if pitch > 0 else "looking down")
    return " and ".join(parts) or "facing the camera"


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _listed(items: list[str]) -> str:
    """Items as prose: "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def attribute_caption(record: dict[str, Any], seed: int = 0, grayscale: bool = False) -> str:
    """The sentence for a sample record; ``grayscale`` (computed by the caller from the pixels) adds
    "black and white". "photo" or "picture" is picked per (seed, sample key)."""
    attributes = {_name(name): value for name, value in (record.get("attributes") or {}).items()}
    picture = "picture" if stable_uniform(seed, record.get("key"), "picture") < 0.5 else "photo"
    shot = " ".join(
        word for word in ("black and white" if grayscale else None, _framing(record), picture) if word
    )
    sentence = f"{_with_article(shot)} of {_subject(attributes)}"
    pose = _pose(record)
    return f"{sentence}, {pose}" if pose else sentence
