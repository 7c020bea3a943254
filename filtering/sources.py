"""Source adapters: list a raw dataset lazily and read one sample's bytes on a worker.

A source yields small item descriptors (``source_path``, where the bytes are, the dataset-provided
caption) in a deterministic order without loading the dataset; :meth:`Source.read` runs on the
workers. Files that are not images by their ending are counted (``ignored``), never silently lost.
Inputs a source refuses (special files, symlinks its ``symlinks`` policy refuses or that loop, damaged
tars, duplicate tar members) become rejected records: listed as items with a ``reject`` entry, or
refused by :meth:`Source.read` with :class:`InputRejected`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filtering.config import SourceConfig
from infu.records import RejectReason
from infu.sample_corpus import ensure_sample_corpus
from infu.steps import StepError

CAPTION_EXTENSIONS = ("txt", "caption")
SPECIAL_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
SPECIAL_MEMBER_KINDS = {
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
}


class SourceError(StepError, ValueError):
    """A source that cannot be read as configured."""


class InputRejected(Exception):
    """An input a source will not read; ``reason`` is the reject reason recorded for it."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def as_item(self, source_path: str) -> dict[str, Any]:
        """A listing item that ingest records as rejected without reading it."""
        return {"source_path": source_path, "reject": {"reason": self.reason.value, "detail": self.detail}}


def read_regular_file(path: Path, offset: int = 0, size: int = -1) -> bytes:
    """``size`` bytes of a regular file from ``offset``; special files are refused before being opened."""
    require_regular_file(path)
    # O_NONBLOCK: a file swapped for a FIFO after the check reads as empty instead of blocking forever
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def require_regular_file(path: Path) -> None:
    """Raise :class:`InputRejected` unless ``path`` is a regular file (a FIFO would block, a device never
    ends)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = SPECIAL_FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise InputRejected(RejectReason.NOT_REGULAR_FILE, f"{kind}: only regular files are read")


class Source(ABC):
    def __init__(self, config: SourceConfig):
        self.config = config
        self.root = Path(config.path)
        self.extensions = {ext.lower().lstrip(".") for ext in config.extensions}
        self.ignored: Counter[str] = Counter()

    @abstractmethod
    def iter_items(self) -> Iterator[dict[str, Any]]:
        """Item descriptors: ``source_path`` plus what :meth:`read` needs, and ``caption`` if any; or
        ``source_path`` and ``reject`` for an input refused at listing (:meth:`InputRejected.as_item`)."""

    @abstractmethod
    def read(self, item: dict[str, Any]) -> bytes:
        """The original bytes of one item (raises ``OSError`` when they cannot be read, and
        :class:`InputRejected` when the source refuses to read them)."""

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

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _real_path(self, path: Path) -> Path:
        """``path`` (absolute, under the root) with its symlinks resolved as ``symlinks`` allows.

        Raises :class:`InputRejected` for a symlink loop or a symlink the policy refuses, and ``OSError``
        when the path does not exist.
        """
        try:
            real = Path(os.path.realpath(path, strict=True))
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise InputRejected(
                    RejectReason.SYMLINK_LOOP, "a symlink loop (too many levels of links)"
                ) from None
            raise
        policy = self.config.symlinks
        if real == path or policy == "follow":
            return real
        if policy == "never":
            raise InputRejected(
                RejectReason.SYMLINK_NOT_FOLLOWED, f"a symlink to {real} (source.symlinks: never)"
            )
        if not real.is_relative_to(self.root):
            raise InputRejected(
                RejectReason.SYMLINK_ESCAPE,
                f"a symlink to {real}, outside the source root {self.root} (source.symlinks: inside)",
            )
        return real

    def _walk(
        self, directory: Path, ancestors: tuple[Path, ...], skip: set[Path]
    ) -> Iterator[dict[str, Any]]:
        """Items of the image files under ``directory`` (not ``skip``), sorted, files before subfolders.

        Folder symlinks are walked as :meth:`_real_path` allows, except into a folder of ``ancestors``
        (the real paths down to ``directory``), which would loop; a refused one is a rejected item, and so
        is a folder that cannot be listed.
        """
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            detail = f"folder not listed: {error.strerror}"
            yield InputRejected(RejectReason.UNREADABLE, detail).as_item(self._relative(directory))
            return
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if path in skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append((path, ancestors[-1] / entry.name))
            elif entry.is_symlink() and os.path.isdir(path):  # False for a loop: a file, rejected on read
                try:
                    real = self._real_path(path)
                    if real in ancestors:
                        raise InputRejected(
                            RejectReason.SYMLINK_LOOP, f"a symlink to {real}, a folder it is in"
                        )
                    subfolders.append((path, real))
                except InputRejected as rejected:
                    yield rejected.as_item(self._relative(path))
            elif self._is_image_name(entry.name):
                yield {"source_path": self._relative(path)}
        for path, real in subfolders:
            yield from self._walk(path, (*ancestors, real), skip)


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
        skip = {Path(self.config.captions)} if self.config.captions else set()
        for item in self._walk(self.root, (self.root,), skip):
            yield item if "reject" in item else {**item, "caption": captions.get(item["source_path"])}

    def read(self, item: dict[str, Any]) -> bytes:
        return read_regular_file(self._real_path(self.root / item["source_path"]))


class WebDatasetSource(Source):
    """Uncompressed webdataset tars (a folder of ``*.tar`` or one tar): ``<key>.<image ext>`` with an
    optional ``<key>.txt`` or ``<key>.json`` (``{"caption": ...}``) caption next to it.

    Listing reads only tar headers and caption members; workers read each image by its byte offset. Of
    members sharing a name the first is read, the others are ``duplicate_member`` rejects; a hard link
    member reads its target's bytes, a symlink or special member is rejected; a tar that cannot be read
    to its end is a ``bad_tar`` reject after the members read before the damage. Captions that are not
    used are counted by reason in ``ignored_captions``.
    """

    def __init__(self, config: SourceConfig):
        super().__init__(config)
        self.ignored_captions: Counter[str] = Counter()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ignored_captions": dict(self.ignored_captions)}

    def _tars(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        tars = sorted(self.root.glob("*.tar"))
        if not tars:
            raise SourceError(f"no .tar files in {self.root}")
        return tars

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for tar_path in self._tars():
            yield from self._tar_items(tar_path)

    def _tar_items(self, tar_path: Path) -> Iterator[dict[str, Any]]:
        try:
            real = self._real_path(tar_path)
            require_regular_file(real)
            archive = tarfile.open(real, "r:")
        except InputRejected as rejected:
            yield rejected.as_item(tar_path.name)
            return
        except (OSError, tarfile.TarError) as error:
            detail = f"cannot be read as an uncompressed tar: {error}"
            yield InputRejected(RejectReason.BAD_TAR, detail).as_item(tar_path.name)
            return
        with archive:
            members, damage = _scan(archive)
            yield from self._samples(tar_path.name, real, archive, members)
        if damage:
            yield InputRejected(RejectReason.BAD_TAR, damage).as_item(tar_path.name)

    def _samples(
        self, tar_name: str, tar: Path, archive: tarfile.TarFile, members: list[tarfile.TarInfo]
    ) -> Iterator[dict[str, Any]]:
        """Items of a tar's members, grouped by consecutive members of one key (image and caption)."""
        names: set[str] = set()
        regular: dict[str, tarfile.TarInfo] = {}
        group, images, captions = None, [], []
        for member in members:
            if member.isdir():
                continue
            key, _, extension = Path(member.name).name.partition(".")
            key = str(Path(member.name).parent / key)
            if key != group:
                yield from self._attach(images, captions)
                group, images, captions = key, [], []
            duplicate = member.name in names
            names.add(member.name)
            if extension in CAPTION_EXTENSIONS or extension == "json":
                caption = self._read_caption(archive, member, extension, duplicate)
                if caption is not None:
                    captions.append(caption)
            elif self._is_image_name(member.name):
                if duplicate:
                    images.append(self._duplicate(tar_name, member.name, names))
                    continue
                if member.isfile() and not member.issparse():
                    regular[member.name] = member
                images.append(self._image(tar_name, tar, member, regular))
        yield from self._attach(images, captions)

    @staticmethod
    def _duplicate(tar_name: str, name: str, names: set[str]) -> dict[str, Any]:
        """The rejected item of a member named like an earlier one, under a name of its own (``<name>#2``)."""
        label = next(f"{name}#{copy}" for copy in itertools.count(2) if f"{name}#{copy}" not in names)
        names.add(label)
        detail = f"{tar_name} has an earlier member named {name}: the first one is read"
        return InputRejected(RejectReason.DUPLICATE_MEMBER, detail).as_item(f"{tar_name}/{label}")

    @staticmethod
    def _image(
        tar_name: str, tar: Path, member: tarfile.TarInfo, regular: dict[str, tarfile.TarInfo]
    ) -> dict[str, Any]:
        """The item of an image member: where its bytes are (a hard link's are its target's)."""
        source_path = f"{tar_name}/{member.name}"
        if member.issym():
            detail = f"a symlink member to {member.linkname}: links inside tars are not followed"
            return InputRejected(RejectReason.SYMLINK_NOT_FOLLOWED, detail).as_item(source_path)
        data = regular.get(member.linkname) if member.islnk() else member
        if data is None:
            detail = f"a hard link member to {member.linkname}, which is no earlier regular member"
            return InputRejected(RejectReason.NOT_REGULAR_FILE, detail).as_item(source_path)
        if not data.isfile() or data.issparse():
            kind = (
                "a sparse member"
                if data.issparse()
                else SPECIAL_MEMBER_KINDS.get(data.type, "a special member")
            )
            detail = f"{kind}: only regular members are read"
            return InputRejected(RejectReason.NOT_REGULAR_FILE, detail).as_item(source_path)
        return {"source_path": source_path, "tar": str(tar), "offset": data.offset_data, "size": data.size}

    def _read_caption(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str, duplicate: bool
    ) -> str | None:
        """The caption a caption member holds; None when it has none (counted in ``ignored_captions``
        unless it is a ``.json`` without a ``caption`` field)."""
        if duplicate:
            self.ignored_captions["duplicate_member"] += 1
            return None
        if not member.isfile():
            self.ignored_captions["not_regular_file"] += 1
            return None
        try:
            text = archive.extractfile(member).read().decode("utf-8", "replace")
        except (OSError, tarfile.TarError):
            self.ignored_captions["unreadable"] += 1
            return None
        if extension != "json":
            return text.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            self.ignored_captions["invalid_json"] += 1
            return None
        caption = value.get("caption") if isinstance(value, dict) else None
        return str(caption) if caption is not None else None

    def _attach(self, images: list[dict[str, Any]], captions: list[str]) -> Iterator[dict[str, Any]]:
        """A group's image items with its (first) caption; the captions of a group without images are
        counted as ``not_next_to_an_image``."""
        if captions and not images:
            self.ignored_captions["not_next_to_an_image"] += len(captions)
        caption = captions[0] if captions else None
        for image in images:
            yield image if "reject" in image else {**image, "caption": caption}

    def read(self, item: dict[str, Any]) -> bytes:
        data = read_regular_file(Path(item["tar"]), item["offset"], item["size"])
        if len(data) != item["size"]:
            raise OSError(f"{Path(item['tar']).name} ends before {item['source_path']} does")
        return data


def _scan(archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str | None]:
    """The members of an open tar up to any damage, and the damage (None when it reads to its end)."""
    members = []
    try:
        for member in archive:
            members.append(member)
        archive.fileobj.seek(archive.offset)
        end = archive.fileobj.read(tarfile.BLOCKSIZE)
        if end == bytes(tarfile.BLOCKSIZE):
            return members, None
        problem = "no valid member header" if end else "no end-of-archive block"
    except tarfile.TarError as error:
        problem = str(error)
    size = os.fstat(archive.fileobj.fileno()).st_size
    where = f"byte {archive.offset} (the tar has {size} bytes)"
    return members, f"truncated or corrupt: {problem} at {where}; earlier members are read"


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
