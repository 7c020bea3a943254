"""Named people given by photos: the evaluation's identities, which the SPSS filter also holds out.

Two folder layouts: an ``identities.yaml`` manifest (``identities: [{name, gender, photo}]``, photos
relative to the folder: the benchmark's), or one sub-folder of photos per person (``<name>/*.jpg``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

IDENTITY_MANIFEST = "identities.yaml"
"""The manifest an identity folder holds."""
IDENTITY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Identity names go into pair ids and seeds: no spaces or slashes."""
IdentityGender = Literal["man", "woman", "unknown"]
PHOTO_PATTERNS = ("*.jpg", "*.jpeg", "*.png", "*.webp")
"""The photos of a person's sub-folder."""


class Identity(BaseModel):
    """A person: a name (unique), a gender (or unknown) and the reference photo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=IDENTITY_NAME)
    gender: IdentityGender = "unknown"
    photo: Path


class _IdentityManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    identities: list[Identity] = Field(min_length=1)


def folder_identities(folder: str | Path) -> list[Identity]:
    """The identities of ``folder``'s ``identities.yaml`` (photos resolved against the folder, each must
    exist; names unique), in manifest order."""
    folder = Path(folder)
    manifest_path = folder / IDENTITY_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"identity folder {folder} has no {IDENTITY_MANIFEST}")
    data = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    try:
        manifest = _IdentityManifest.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"identity manifest {manifest_path} is invalid: {error}") from error
    identities = [
        identity.model_copy(update={"photo": (folder / identity.photo).resolve()})
        for identity in manifest.identities
    ]
    check_identities(identities, str(manifest_path))
    return identities


def check_identities(identities: list[Identity], source: str) -> None:
    """Names unique (they make pair ids and seeds) and every photo there."""
    check_unique_names(identities, source)
    missing = [str(identity.photo) for identity in identities if not identity.photo.is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: identity photos missing: {missing}")


def check_unique_names(identities: list[Identity], source: str) -> None:
    repeated = sorted(name for name, count in Counter(i.name for i in identities).items() if count > 1)
    if repeated:
        raise ValueError(f"{source}: identity names repeat: {repeated}")


def identity_photos(folder: str | Path) -> dict[str, list[Path]]:
    """Name -> photos of the people in ``folder``: its ``identities.yaml`` when it has one, else one
    sub-folder of photos per person."""
    folder = Path(folder)
    if (folder / IDENTITY_MANIFEST).is_file():
        return {identity.name: [identity.photo] for identity in folder_identities(folder)}
    return {
        person.name: sorted(path for pattern in PHOTO_PATTERNS for path in person.glob(pattern))
        for person in sorted(folder.iterdir())
        if person.is_dir()
    }
