"""Source adapters: list a raw dataset lazily and read one sample's bytes on a worker.

A source yields small item descriptors (``source_path``, where the bytes are, the dataset-provided
caption) in a deterministic order without loading the dataset; :meth:`Source.read` runs on the
workers. Files that are not images by their ending are counted (``ignored``), never silently lost.
"""

from __future__ import annotations

import json
import os
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filtering.config import SourceConfig
from infu.sample_corpus import ensure_sample_corpus
from infu.steps import StepError

CAPTION_EXTENSIONS = ("txt", "caption")


class SourceError(StepError, ValueError):
    """A source that cannot be read as configured."""


class Source(ABC):
    def __init__(self, config: SourceConfig):
        self.config = config
        self.root = Path(config.path)
        self.extensions = {ext.lower().lstrip(".") for ext in config.extensions}
        self.ignored: Counter[str] = Counter()

    @abstractmethod
    def iter_items(self) -> Iterator[dict[str, Any]]:
        """Item descriptors: ``source_path`` plus what :meth:`read` needs, and ``caption`` if any."""

    @abstractmethod
    def read(self, item: dict[str, Any]) -> bytes:
        """The original bytes of one item (raises ``OSError`` when they cannot be read)."""

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.config.kind,
            "path": str(self.root),
            "dataset": self.config.dataset,
            "ignored_files": dict(self.ignored),
        }

    def _is_image_name(self, name: str) -> bool:
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if extension in self.extensions:
            return True
        self.ignored[extension or "<none>"] += 1
        return False


class FolderSource(Source):
    """A folder tree of images, optionally with a JSONL captions file of ``{"path", "caption"}``."""

    def __init__(self, config: SourceConfig):
        super().__init__(config)
        if not self.root.is_dir():
            raise SourceError(f"source folder {self.root} does not exist")

    def _captions(self) -> dict[str, str]:
        path = self.config.captions
        if path is None:
            return {}
        captions = {}
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise SourceError(f"cannot read captions file {path}: {error.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[str(entry["path"])] = str(entry["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SourceError(
                    f'{path}:{number}: expected {{"path": ..., "caption": ...}} ({error})'
                ) from None
        return captions

    def iter_items(self) -> Iterator[dict[str, Any]]:
        captions = self._captions()
        captions_file = Path(self.config.captions).resolve() if self.config.captions else None
        for directory, subdirs, files in os.walk(self.root):
            subdirs.sort()
            for name in sorted(files):
                path = Path(directory, name)
                if path.resolve() == captions_file or not self._is_image_name(name):
                    continue
                relative = path.relative_to(self.root).as_posix()
                yield {"source_path": relative, "caption": captions.get(relative)}

    def read(self, item: dict[str, Any]) -> bytes:
        return (self.root / item["source_path"]).read_bytes()


class WebDatasetSource(Source):
    """Uncompressed webdataset tars (a folder of ``*.tar`` or one tar): ``<key>.<image ext>`` with an
    optional ``<key>.txt`` or ``<key>.json`` (``{"caption": ...}``) caption.

    Listing reads only tar headers and caption members; workers read each image by its byte offset.
    """

    def _tars(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        tars = sorted(self.root.glob("*.tar"))
        if not tars:
            raise SourceError(f"no .tar files in {self.root}")
        return tars

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for tar_path in self._tars():
            try:
                archive = tarfile.open(tar_path, "r:")
            except tarfile.TarError as error:
                raise SourceError(f"{tar_path} is not an uncompressed tar: {error}") from None
            with archive:
                yield from self._group(tar_path, archive)

    def _group(self, tar_path: Path, archive: tarfile.TarFile) -> Iterator[dict[str, Any]]:
        images: list[dict[str, Any]] = []
        captions: dict[str, str] = {}
        current = None
        for member in archive:
            if not member.isfile():
                continue
            key, _, extension = Path(member.name).name.partition(".")
            key = str(Path(member.name).parent / key)
            if key != current:
                yield from self._attach(images, captions)
                images, captions, current = [], {}, key
            if extension in CAPTION_EXTENSIONS or extension == "json":
                handle = archive.extractfile(member)
                text = handle.read().decode("utf-8", "replace") if handle else ""
                caption = self._caption(text, extension)
                if caption is not None:
                    captions[key] = caption
            elif self._is_image_name(member.name):
                images.append(
                    {
                        "source_path": f"{tar_path.name}/{member.name}",
                        "tar": str(tar_path),
                        "offset": member.offset_data,
                        "size": member.size,
                        "_key": key,
                    }
                )
        yield from self._attach(images, captions)

    @staticmethod
    def _caption(text: str, extension: str) -> str | None:
        if extension != "json":
            return text.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        caption = value.get("caption") if isinstance(value, dict) else None
        return str(caption) if caption is not None else None

    @staticmethod
    def _attach(images: list[dict[str, Any]], captions: dict[str, str]) -> Iterator[dict[str, Any]]:
        for image in images:
            key = image.pop("_key")
            yield {**image, "caption": captions.get(key)}

    def read(self, item: dict[str, Any]) -> bytes:
        with open(item["tar"], "rb") as handle:
            handle.seek(item["offset"])
            data = handle.read(item["size"])
        if len(data) != item["size"]:
            raise OSError(f"{item['tar']} ends before {item['source_path']} does")
        return data


class SampleCorpusSource(FolderSource):
    """The embedded sample corpus, built on first use (see :mod:`infu.sample_corpus`)."""

    def __init__(self, config: SourceConfig):
        ensure_sample_corpus(config.path)
        if config.captions is None:
            config = config.model_copy(update={"captions": Path(config.path) / "captions.jsonl"})
        super().__init__(config)


SOURCES: dict[str, type[Source]] = {
    "folder": FolderSource,
    "webdataset": WebDatasetSource,
    "sample_corpus": SampleCorpusSource,
}


def open_source(config: SourceConfig) -> Source:
    from filtering.datasets import DATASET_SOURCES

    return {**SOURCES, **DATASET_SOURCES}[config.kind](config)
