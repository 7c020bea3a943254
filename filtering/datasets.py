"""Source adapters for the public datasets of the SPSS pretraining data, in their distributed layouts.

Each adapter takes the dataset root as ``config.path`` and reads its own annotation files from there
(``config.captions`` is not used). Items carry ``source_path`` relative to the root, ``caption`` (text
shipped with the dataset, else None) and, where the dataset has them, ``identity`` (a string: celebrity,
subject, clip or video-person id) and ``attributes`` (attribute name -> value string, a hint for
captioning: CelebA's 40 as ``"true"``/``"false"``, CelebV-HQ's positive labels as ``"true"`` and its
emotions under ``"emotion"``, CosmicManHQ's annotated values); several values of one name are joined
with ``", "``.
Folders are walked in sorted order; annotation files are streamed or held as compact per-file values.
See docs/datasets.md for the layouts and what is ignored.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from filtering.config import SourceConfig
from filtering.sources import Source, SourceError, read_regular_file

VIDEO_NOTE = (
    "raw videos (.mp4) are not decoded: extract frames to <clip_id>/<frame>.png|jpg under the dataset root"
)


class DatasetSource(Source):
    """A dataset root walked in sorted order.

    ``image_dirs`` are the folders (relative to the root) that hold the images, ``""`` being the whole
    root; ``annotation_paths`` are files or folders the adapter reads itself, so they are neither walked
    nor counted as ignored. Other top-level entries are listed as ``not_walked`` by :meth:`describe`.
    """

    image_dirs: tuple[str, ...] = ("",)
    annotation_paths: tuple[str, ...] = ()

    def __init__(self, config: SourceConfig):
        super().__init__(config)
        if not self.root.is_dir():
            raise SourceError(f"dataset folder {self.root} does not exist")

    def read(self, item: dict[str, Any]) -> bytes:
        return read_regular_file(self._real_path(self.root / item["source_path"]))

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        folders = self._image_dirs()
        if folders and "" not in folders:
            walked = {PurePosixPath(folder).parts[0] for folder in folders}
            read = {PurePosixPath(path).parts[0] for path in self.annotation_paths}
            description["not_walked"] = sorted(
                entry.name for entry in self.root.iterdir() if entry.name not in walked | read
            )
        return description

    def _image_dirs(self) -> tuple[str, ...]:
        return self.image_dirs

    def _walk_images(self) -> Iterator[str]:
        """Root-relative POSIX paths of the images under ``image_dirs``, sorted; other files are counted."""
        skipped = {self.root / path for path in self.annotation_paths}
        for folder in self._image_dirs():
            top = self.root / folder
            if not top.is_dir():
                raise SourceError(f"{top} does not exist: expected the {type(self).__name__} layout")
            for directory, subdirs, files in os.walk(top):
                subdirs[:] = sorted(name for name in subdirs if Path(directory, name) not in skipped)
                for name in sorted(files):
                    path = Path(directory, name)
                    if path not in skipped and self._is_image_name(name):
                        yield path.relative_to(self.root).as_posix()

    def _find(self, *candidates: str) -> Path | None:
        """The first existing annotation file among root-relative candidates."""
        for candidate in candidates:
            if (self.root / candidate).is_file():
                return self.root / candidate
        return None


class VGGFace2Source(DatasetSource):
    """VGGFace2: ``{train,test}/<class id>/<image>.jpg``; identity = the class-id folder, no captions."""

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for relative in self._walk_images():
            identity = PurePosixPath(relative).parent.name
            yield {"source_path": relative, "caption": None, "identity": identity or None}


class MillionCelebsSource(DatasetSource):
    """MillionCelebs as identity folders ``<celebrity id>/.../<image>.jpg``; identity = first component."""

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for relative in self._walk_images():
            parts = PurePosixPath(relative).parts
            yield {"source_path": relative, "caption": None, "identity": parts[0] if len(parts) > 1 else None}


class CelebASource(DatasetSource):
    """CelebA images with attributes (``list_attr_celeba.txt``) and identities (``identity_CelebA.txt``).

    The in-the-wild ``img_celeba`` folder is preferred over ``img_align_celeba`` when both are present.
    Annotations are held as one small value per file name (~200k entries: an attribute bit mask and an
    identity number), a few tens of MB.
    """

    IMAGE_FOLDERS = ("img_celeba", "Img/img_celeba", "img_align_celeba", "Img/img_align_celeba")
    ATTRIBUTES_FILES = ("Anno/list_attr_celeba.txt", "list_attr_celeba.txt")
    IDENTITY_FILES = ("Anno/identity_CelebA.txt", "identity_CelebA.txt")
    annotation_paths = ATTRIBUTES_FILES + IDENTITY_FILES

    def _image_dirs(self) -> tuple[str, ...]:
        for folder in self.IMAGE_FOLDERS:
            if (self.root / folder).is_dir():
                return (folder,)
        raise SourceError(f"{self.root} has none of the CelebA image folders {list(self.IMAGE_FOLDERS)}")

    def describe(self) -> dict[str, Any]:
        used = [self._find(*self.ATTRIBUTES_FILES), self._find(*self.IDENTITY_FILES)]
        return {
            **super().describe(),
            "image_folder": self._image_dirs()[0],
            "annotations": [path.relative_to(self.root).as_posix() for path in used if path],
        }

    def iter_items(self) -> Iterator[dict[str, Any]]:
        names, masks = self._attributes()
        identities = self._identities()
        for relative in self._walk_images():
            file_name = PurePosixPath(relative).name
            mask = masks.get(file_name)
            attributes = (
                None
                if mask is None
                else {name: "true" if mask >> bit & 1 else "false" for bit, name in enumerate(names)}
            )
            identity = identities.get(file_name)
            yield {
                "source_path": relative,
                "caption": None,
                "identity": None if identity is None else str(identity),
                "attributes": attributes,
            }

    def _attributes(self) -> tuple[list[str], dict[str, int]]:
        """Attribute names and, per file name, a bit mask of its positive (``1``) attributes."""
        path = self._find(*self.ATTRIBUTES_FILES)
        if path is None:
            return [], {}
        masks: dict[str, int] = {}
        with open(path, encoding="utf-8") as handle:
            declared = _parse_int(handle.readline(), path, 1, "the image count")
            names = handle.readline().split()
            if not names:
                raise SourceError(f"{path}:2: expected the attribute names")
            for number, line in enumerate(handle, 3):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != len(names) + 1 or any(value not in ("1", "-1") for value in fields[1:]):
                    raise SourceError(
                        f"{path}:{number}: expected a file name and {len(names)} values of 1 or -1, "
                        f"got {line.strip()!r}"
                    )
                masks[fields[0]] = sum(1 << bit for bit, value in enumerate(fields[1:]) if value == "1")
        if declared != len(masks):
            raise SourceError(f"{path}:1: declares {declared} images but lists {len(masks)}")
        return names, masks

    def _identities(self) -> dict[str, int]:
        path = self._find(*self.IDENTITY_FILES)
        if path is None:
            return {}
        identities: dict[str, int] = {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise SourceError(
                        f"{path}:{number}: expected `<file name> <identity>`, got {line.strip()!r}"
                    )
                identities[fields[0]] = _parse_int(fields[1], path, number, "the identity number")
        return identities


class FFHQSource(DatasetSource):
    """FFHQ: ``images1024x1024/<thousands>/<index>.png``; no captions or identities."""

    image_dirs = ("images1024x1024",)

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for relative in self._walk_images():
            yield {"source_path": relative, "caption": None}


class EasyPortraitSource(DatasetSource):
    """EasyPortrait: ``images/{train,val,test}/<attachment id>.jpg``; the masks in ``annotations/`` are not
    read. Identity = ``user_id`` from the meta-information CSV (extracted ``meta.zip``) when present.
    """

    image_dirs = ("images",)
    META_FILES = ("annotations/meta.csv", "meta.csv")
    annotation_paths = META_FILES

    def iter_items(self) -> Iterator[dict[str, Any]]:
        users = self._users()
        for relative in self._walk_images():
            yield {
                "source_path": relative,
                "caption": None,
                "identity": users.get(PurePosixPath(relative).stem),
            }

    def _users(self) -> dict[str, str]:
        """``attachment_id`` -> ``user_id`` (40k short strings)."""
        path = self._find(*self.META_FILES)
        if path is None:
            return {}
        users = {}
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"attachment_id", "user_id"} - set(reader.fieldnames or ())
            if missing:
                raise SourceError(f"{path}:1: the header lacks the columns {sorted(missing)}")
            for row in reader:
                attachment, user = row["attachment_id"], row["user_id"]
                if not attachment or not user:
                    raise SourceError(f"{path}:{reader.line_num}: expected an attachment_id and a user_id")
                users[attachment] = user
        return users


class VideoFramesSource(DatasetSource):
    """Frames pre-extracted from a video dataset's clips: ``<clip_id>/<frame>.png|jpg`` anywhere under the
    root; identity = the clip folder. Raw ``.mp4`` clips are counted as ignored (see :data:`VIDEO_NOTE`).
    """

    def iter_items(self) -> Iterator[dict[str, Any]]:
        describe_clip = self._clip_describer()
        current_clip, fields = None, {}
        for relative in self._walk_images():
            clip = PurePosixPath(relative).parent.name
            if clip != current_clip:
                current_clip, fields = clip, describe_clip(clip)
            yield {"source_path": relative, **fields}

    def _clip_describer(self) -> Callable[[str], dict[str, Any]]:
        """Clip folder name -> the item fields shared by its frames."""
        return lambda clip: {"caption": None, "identity": clip or None}

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        if self.ignored["mp4"]:
            description["note"] = VIDEO_NOTE
        return description


class CelebVHQSource(VideoFramesSource):
    """CelebV-HQ frames; attributes per clip from ``celebvhq_info.json`` (appearance and action labels
    set to 1 as ``"true"``, and the clip's emotions under ``"emotion"``). The JSON (~36k clips) is loaded
    whole and kept as one small dict per clip.
    """

    INFO_FILE = "celebvhq_info.json"
    annotation_paths = (INFO_FILE,)

    def _clip_describer(self) -> Callable[[str], dict[str, Any]]:
        attributes = self._clip_attributes()
        return lambda clip: {"caption": None, "identity": clip or None, "attributes": attributes.get(clip)}

    def _clip_attributes(self) -> dict[str, dict[str, str]]:
        path = self.root / self.INFO_FILE
        if not path.is_file():
            return {}
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        try:
            appearance_names = info["meta_info"]["appearance_mapping"]
            action_names = info["meta_info"]["action_mapping"]
            clips = info["clips"].items()
        except (KeyError, TypeError, AttributeError):
            raise SourceError(
                f"{path}: expected `meta_info` with the attribute mappings and `clips`"
            ) from None
        attributes = {}
        for clip, entry in clips:
            try:
                labels = entry["attributes"]
                appearance = _positive(labels["appearance"], appearance_names)
                actions = _positive(labels["action"], action_names)
                attributes[clip] = {
                    **dict.fromkeys(appearance + actions, "true"),
                    "emotion": _emotions(labels["emotion"]),
                }
            except (KeyError, TypeError, ValueError) as error:
                raise SourceError(f"{path}: clip {clip!r}: malformed attributes ({error!r})") from None
        return attributes


class CelebVTextSource(VideoFramesSource):
    """CelebV-Text frames; caption = the first line of the clip's ``texts/face40_details_new/<clip>.txt``
    (its static appearance description). The other text folders describe motion and are not read.
    """

    TEXTS_FOLDER = "texts"
    APPEARANCE_TEXTS = "texts/face40_details_new"
    annotation_paths = (TEXTS_FOLDER,)

    def _clip_describer(self) -> Callable[[str], dict[str, Any]]:
        return lambda clip: {"caption": self._clip_text(clip) if clip else None, "identity": clip or None}

    def _clip_text(self, clip: str) -> str | None:
        path = self.root / self.APPEARANCE_TEXTS / f"{clip}.txt"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise SourceError(f"{path}:{line}: not UTF-8 text") from None
        return next((line.strip() for line in text.splitlines() if line.strip()), None)


class VFHQSource(VideoFramesSource):
    """VFHQ frames in clip folders ``Clip+<video id>+P<person>+C<clip>+F<first>-<last>/<frame>.png``;
    identity = ``<video id>+P<person>`` (one person of one video), else the clip folder name.
    """

    CLIP_NAME = re.compile(r"Clip\+(?P<video>[^+]+)\+P(?P<person>\d+)\+C\d+\+F\d+-\d+")

    def _clip_describer(self) -> Callable[[str], dict[str, Any]]:
        def describe(clip: str) -> dict[str, Any]:
            match = self.CLIP_NAME.fullmatch(clip)
            identity = f"{match['video']}+P{match['person']}" if match else clip or None
            return {"caption": None, "identity": identity}

        return describe


class CosmicManHQSource(DatasetSource):
    """CosmicManHQ-1.0: Parquet annotations in ``label/*.parquet``, one row per image with its
    root-relative ``path``; caption = the ``caption`` column when the files have one; attributes = the
    ``person_type`` and the ``aa_text`` body-part attributes by name.

    Only images listed in the annotations are read (rows streamed in batches); the human-parsing maps
    (``segm_path``) are not images to ingest.
    """

    LABEL_FOLDER = "label"
    image_dirs = ()
    annotation_paths = (LABEL_FOLDER,)
    BATCH_ROWS = 1024

    def iter_items(self) -> Iterator[dict[str, Any]]:
        label_files = sorted((self.root / self.LABEL_FOLDER).glob("*.parquet"))
        if not label_files:
            raise SourceError(f"no .parquet annotations in {self.root / self.LABEL_FOLDER}")
        for label_file in label_files:
            yield from self._rows(label_file)

    def _rows(self, label_file: Path) -> Iterator[dict[str, Any]]:
        try:
            parquet = pq.ParquetFile(label_file)
        except (pa.ArrowException, OSError) as error:
            raise SourceError(f"{label_file} is not a readable Parquet file: {error}") from None
        available = set(parquet.schema_arrow.names)
        if "path" not in available:
            raise SourceError(f"{label_file}: no `path` column (columns: {sorted(available)})")
        columns = [name for name in ("path", "caption", "person_type", "aa_text") if name in available]
        number = 0
        for batch in parquet.iter_batches(batch_size=self.BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                number += 1
                where = f"{label_file}:row {number}"
                path = _relative_path(row["path"], where)
                if not self._is_image_name(PurePosixPath(path).name):
                    continue
                caption = row.get("caption")
                yield {
                    "source_path": path,
                    "caption": (caption.strip() or None) if isinstance(caption, str) else None,
                    "attributes": _cosmicman_attributes(row.get("person_type"), row.get("aa_text"), where),
                }


def _parse_int(text: str, path: Path, number: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"{path}:{number}: expected {what}, got {text.strip()!r}") from None


def _positive(flags: list[int], names: list[str]) -> list[str]:
    """Names whose flag is 1 (flags and names in the same order)."""
    if len(flags) != len(names) or any(flag not in (0, 1) for flag in flags):
        raise ValueError(f"expected {len(names)} flags of 0 or 1, got {flags}")
    return [name for name, flag in zip(names, flags, strict=True) if flag == 1]


def _emotions(emotion: dict[str, Any]) -> str:
    """CelebV-HQ ``emotion``: one label, or with ``sep_flag`` a list of timed ``{"emotion": ...}``."""
    if not emotion["sep_flag"]:
        return str(emotion["labels"])
    return _join_distinct(str(segment["emotion"]) for segment in emotion["labels"])


def _join_distinct(values: Iterable[str]) -> str:
    """The distinct values in first-seen order, joined with ``", "``."""
    return ", ".join(dict.fromkeys(values))


def _relative_path(value: Any, where: str) -> str:
    path = PurePosixPath(value) if isinstance(value, str) and value else None
    if path is None or path.is_absolute() or ".." in path.parts:
        raise SourceError(f"{where}: `path` {value!r} is not a path inside the dataset root")
    return path.as_posix()


def _cosmicman_attributes(person_type: Any, aa_text: Any, where: str) -> dict[str, str] | None:
    """``person_type`` and the non-empty ``aa_text`` values (a JSON list of per-body-part dicts or nulls)
    by name; a name found in several body parts (``material``, ``color``...) gets their distinct values."""
    if person_type is None and aa_text is None:
        return None
    values: dict[str, list[str]] = {"person_type": [str(person_type)]} if person_type else {}
    if isinstance(aa_text, str):
        try:
            aa_text = json.loads(aa_text)
        except json.JSONDecodeError as error:
            raise SourceError(f"{where}: `aa_text` is not valid JSON ({error.msg})") from None
    if aa_text is None:
        return _joined(values)
    if not isinstance(aa_text, list):
        raise SourceError(f"{where}: `aa_text` should be a list of body-part attributes")
    for part in aa_text:
        if part is None:
            continue
        if not isinstance(part, dict) or not all(
            isinstance(value, str | int | float | None) for value in part.values()
        ):
            raise SourceError(
                f"{where}: `aa_text` entries should map attribute names to values, got {part!r}"
            )
        for name, value in part.items():
            if value not in (None, ""):
                values.setdefault(name, []).append(str(value))
    return _joined(values)


def _joined(values: dict[str, list[str]]) -> dict[str, str]:
    """Attribute name -> its values, as name -> the distinct values joined."""
    return {name: _join_distinct(found) for name, found in values.items()}


DATASET_SOURCES: dict[str, type[Source]] = {
    "vggface2": VGGFace2Source,
    "millioncelebs": MillionCelebsSource,
    "celeba": CelebASource,
    "celebv_hq": CelebVHQSource,
    "celebv_text": CelebVTextSource,
    "vfhq": VFHQSource,
    "ffhq": FFHQSource,
    "easyportrait": EasyPortraitSource,
    "cosmicman_hq": CosmicManHQSource,
}
