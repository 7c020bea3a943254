"""Ingest source reliability (issue 9, defects 1-5, 12, 13), each test built from its reproduction.

Duplicate tar member names, undecodable file names, symlink loops, FIFOs, truncated tars, link and
stray caption members, and symlinks out of the source root: each becomes a counted reject (or a counted
ignored caption) with its reason, the good samples keep their own bytes, and the run completes.

The reproductions share two ingest runs (a Ray Data job each): one folder source holding every folder
case, and one webdataset source (a folder of tars) holding every tar case, each with good inputs next to
the bad ones. Each test checks its own rows of those runs; the fixtures check what holds for every row.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from filtering.ingest import run_ingest
from infu.config import load_config
from infu.index import DatasetIndex
from infu.records import new_record, sample_key
from infu.shards import Sample, ShardWriter, TarReader, iter_tar, read_records

from ..conftest import EMBEDDED

# Every test: the FIFO of defect 4 would block a read forever, and the folder run that lists it is set
# up by whichever test asks for it first.
pytestmark = pytest.mark.timeout(300)


def jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), colour).save(buffer, "JPEG")
    return buffer.getvalue()


RED, BLUE = jpeg("red"), jpeg("blue")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Ingested:
    """One ingest run: its manifest, its records by source path and its kept samples by source path."""

    manifest: dict
    records: dict[str, dict]
    samples: dict[str, Sample]

    def outcomes(self, *paths: str) -> dict[str, str]:
        """The status or reject reason of the rows of ``paths`` (each one must be a row)."""
        return {path: self.records[path]["reject_reason"] or self.records[path]["status"] for path in paths}

    def reasons(self, *reasons: str) -> dict[str, int]:
        """How many rejects the manifest counts for each of ``reasons``."""
        return {reason: self.manifest["counts"]["reasons"].get(reason, 0) for reason in reasons}

    def images(self, *paths: str) -> dict[str, bytes]:
        """The kept image bytes of those of ``paths`` that are kept samples."""
        return {path: self.samples[path].image for path in paths if path in self.samples}


def ingest(run_dir: Path, kind: str, source: Path, rows: set[str]) -> Ingested:
    """Run ingest of ``source`` as dataset ``d`` and check what holds for every row: the run completes,
    ``rows`` are exactly its rows (one each), keys are distinct, every reject is counted by its reason,
    and the kept samples are exactly the ``ok`` rows, each with its own record and sha256."""
    config = load_config(
        EMBEDDED,
        [
            f"run.run_dir={run_dir}",
            f"ingest.source.kind={kind}",
            f"ingest.source.path={source}",
            "ingest.source.dataset=d",
        ],
    )
    manifest = run_ingest(config)
    out_dir = config.step_dir("ingest")
    assert manifest["status"] == "complete" and manifest["failed_shards"] == {}
    assert DatasetIndex(out_dir).duplicate_keys() == []

    listed = read_records(out_dir)
    records = {record["source_path"]: record for record in listed}
    assert len(records) == len(listed) and set(records) == rows
    assert len({record["key"] for record in listed}) == len(listed)
    rejects = Counter(record["reject_reason"] for record in listed if record["reject_reason"])
    assert manifest["counts"]["reasons"] == dict(rejects)

    kept = [sample for path in sorted(out_dir.glob("*.tar")) for sample in iter_tar(path)]
    samples = {sample.record["source_path"]: sample for sample in kept}
    assert len(samples) == len(kept)
    assert set(samples) == {path for path, record in records.items() if record["status"] == "ok"}
    for path, sample in samples.items():
        assert sample.record["key"] == records[path]["key"]
        assert sample.record["sha256"] == records[path]["sha256"] == sha(sample.image)
    return Ingested(manifest, records, samples)


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


# The folder source: a good file, and the inputs of defects 2, 3, 4 and 13 next to it.
FOLDER_ROWS = {
    "a.jpg",  # good: RED
    "bad\\xff.jpg",  # defect 2: BLUE under a name that is not UTF-8
    "l1.jpg",  # defect 3: ln -s l2.jpg l1.jpg
    "l2.jpg",  # defect 3: ln -s l1.jpg l2.jpg
    "sub/up",  # defect 3: ln -s .. sub/up
    "pipe.jpg",  # defect 4: mkfifo pipe.jpg
    "l.jpg",  # defect 13: ln -s ../out/s.jpg l.jpg (BLUE)
    "p.jpg",  # defect 13: ln -s /etc/passwd p.jpg
    "in.jpg",  # defect 13: ln -s a.jpg in.jpg, a link inside the root
}


@pytest.fixture(scope="module")
def folder_run(local_ray, tmp_path_factory) -> Ingested:
    base = tmp_path_factory.mktemp("folder")
    folder, outside = base / "src", base / "out"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "a.jpg").write_bytes(RED)
    Path(os.fsdecode(os.fsencode(folder) + b"/bad\xff.jpg")).write_bytes(BLUE)
    (folder / "l1.jpg").symlink_to("l2.jpg")
    (folder / "l2.jpg").symlink_to("l1.jpg")
    (folder / "sub" / "up").symlink_to("..")
    os.mkfifo(folder / "pipe.jpg")
    (outside / "s.jpg").write_bytes(BLUE)
    (folder / "l.jpg").symlink_to(outside / "s.jpg")
    (folder / "p.jpg").symlink_to("/etc/passwd")
    (folder / "in.jpg").symlink_to("a.jpg")
    return ingest(base / "run", "folder", folder, FOLDER_ROWS)


def truncated_tars() -> tuple[dict[str, bytes], int]:
    """``head -c N full.tar > cut.tar`` cut inside the second member's data and inside its header, and
    the offset of that header."""
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for name, data in (("s1.jpg", RED), ("s2.jpg", BLUE), ("s3.jpg", RED)):
            add_member(tar, name, data)
    with tarfile.open(fileobj=io.BytesIO(full.getvalue())) as tar:
        second = tar.getmembers()[1]
    cuts = {"cut-data.tar": second.offset_data + 100, "cut-header.tar": second.offset + 100}
    return {name: full.getvalue()[:size] for name, size in cuts.items()}, second.offset


CUT_TARS, SECOND_HEADER = truncated_tars()

# The webdataset source: a good tar, and the tars of defects 1, 5 and 12 next to it.
TAR_ROWS = {
    "good.tar/g1.jpg",  # good: BLUE with its caption
    "good.tar/g2.jpg",  # good: RED
    "dup.tar/dup.jpg",  # defect 1: tar cf dup.tar dup.jpg (red)
    "dup.tar/dup.jpg#2",  # defect 1: tar rf dup.tar dup.jpg (blue)
    "cut-data.tar/s1.jpg",  # defect 5: cut inside s2.jpg's data
    "cut-data.tar/s2.jpg",
    "cut-data.tar",
    "cut-header.tar/s1.jpg",  # defect 5: cut inside s2.jpg's header
    "cut-header.tar",
    *(f"links.tar/k{number}.jpg" for number in (1, 2, 3, 4, 6, 7)),  # defect 12
}


@pytest.fixture(scope="module")
def tar_run(local_ray, tmp_path_factory) -> Ingested:
    base = tmp_path_factory.mktemp("webdataset")
    wds = base / "wds"
    wds.mkdir()
    with tarfile.open(wds / "good.tar", "w") as tar:
        add_member(tar, "g1.jpg", BLUE)
        add_member(tar, "g1.txt", b"caption of g1")
        add_member(tar, "g2.jpg", RED)
    with tarfile.open(wds / "dup.tar", "w") as tar:
        add_member(tar, "dup.jpg", RED)
        add_member(tar, "dup.jpg", BLUE)
    for name, data in CUT_TARS.items():
        (wds / name).write_bytes(data)
    with tarfile.open(wds / "links.tar", "w") as tar:
        add_member(tar, "k1.jpg", RED)
        add_member(tar, "k1.txt", b"caption of k1")
        add_member(tar, "k2.jpg", type=tarfile.SYMTYPE, linkname="k1.jpg")
        add_member(tar, "k3.jpg", type=tarfile.LNKTYPE, linkname="k1.jpg")
        add_member(tar, "k4.jpg", type=tarfile.FIFOTYPE)
        add_member(tar, "k5.txt", b"caption without an image")
        add_member(tar, "k6.jpg", BLUE)
        add_member(tar, "k7.jpg", RED)
        add_member(tar, "k6.txt", b"caption after another sample")
    return ingest(base / "run", "webdataset", wds, TAR_ROWS)


def test_duplicate_tar_member_names_keep_the_first_and_reject_the_others(tar_run):
    """Defect 1: ``tar cf dup.tar dup.jpg (red); tar rf dup.tar dup.jpg (blue)``."""
    rows = ("dup.tar/dup.jpg", "dup.tar/dup.jpg#2")
    assert tar_run.outcomes(*rows) == {"dup.tar/dup.jpg": "ok", "dup.tar/dup.jpg#2": "duplicate_member"}
    assert tar_run.reasons("duplicate_member") == {"duplicate_member": 1}
    assert "earlier member named dup.jpg" in tar_run.records["dup.tar/dup.jpg#2"]["reject_detail"]
    assert tar_run.records["dup.tar/dup.jpg"]["key"] != tar_run.records["dup.tar/dup.jpg#2"]["key"]
    assert tar_run.images(*rows) == {"dup.tar/dup.jpg": RED}
    sample = tar_run.samples["dup.tar/dup.jpg"]
    assert sample.record["key"] == tar_run.records["dup.tar/dup.jpg"]["key"]
    assert sample.image == RED and sample.record["sha256"] == sha(RED)


def test_shard_readers_never_mix_two_samples_written_under_one_key(tmp_path):
    """Defect 1, reading side: a shard with one key twice yields two samples, each with its own bytes
    (``iter_tar``); random access by member name refuses it (``TarReader``)."""
    with ShardWriter(tmp_path, "000000") as writer:
        for data in (RED, BLUE):
            writer.add(new_record("d", "dup.jpg", sha256=sha(data)), data, "jpg")
        writer.commit()
    samples = list(iter_tar(tmp_path / "000000.tar"))
    assert [sample.image for sample in samples] == [RED, BLUE]
    assert [sample.record["sha256"] for sample in samples] == [sha(RED), sha(BLUE)]
    with pytest.raises(ValueError, match="two members named"):
        TarReader(tmp_path / "000000.tar")


def test_an_undecodable_file_name_is_a_row_keyed_by_its_bytes(folder_run):
    """Defect 2: ``a.jpg`` and ``bad\\xff.jpg`` in one folder."""
    rows = ("a.jpg", "bad\\xff.jpg")
    assert folder_run.outcomes(*rows) == {"a.jpg": "ok", "bad\\xff.jpg": "ok"}
    assert folder_run.records["bad\\xff.jpg"]["key"] == sample_key("d", os.fsdecode(b"bad\xff.jpg"))
    assert folder_run.records["bad\\xff.jpg"]["key"] != sample_key("d", "bad\\xff.jpg")
    assert folder_run.images(*rows) == {"a.jpg": RED, "bad\\xff.jpg": BLUE}


def test_symlink_loops_are_rejected_and_the_rest_is_ingested(folder_run):
    """Defect 3: ``ln -s l2.jpg l1.jpg; ln -s l1.jpg l2.jpg`` (and a folder link back to its parent)."""
    rows = ("a.jpg", "l1.jpg", "l2.jpg", "sub/up")
    assert folder_run.outcomes(*rows) == {
        "a.jpg": "ok",
        "l1.jpg": "symlink_loop",
        "l2.jpg": "symlink_loop",
        "sub/up": "symlink_loop",
    }
    assert folder_run.reasons("symlink_loop") == {"symlink_loop": 3}
    assert folder_run.images(*rows) == {"a.jpg": RED}


def test_a_fifo_named_like_an_image_is_rejected_without_being_opened(folder_run):
    """Defect 4: ``mkfifo pipe.jpg`` (reading it would block forever)."""
    rows = ("a.jpg", "pipe.jpg")
    assert folder_run.outcomes(*rows) == {"a.jpg": "ok", "pipe.jpg": "not_regular_file"}
    assert "a FIFO" in folder_run.records["pipe.jpg"]["reject_detail"]
    assert folder_run.reasons("not_regular_file") == {"not_regular_file": 1}
    assert folder_run.images(*rows) == {"a.jpg": RED}


def test_a_truncated_tar_keeps_its_intact_members_and_is_a_named_reject(tar_run):
    """Defect 5: ``head -c N full.tar > cut.tar``, cut inside a member's data and inside a header; the
    other tars of the source are read as usual."""
    rows = ("cut-data.tar/s1.jpg", "cut-data.tar/s2.jpg", "cut-data.tar")
    assert tar_run.outcomes(*rows) == {
        "cut-data.tar/s1.jpg": "ok",
        "cut-data.tar/s2.jpg": "unreadable",
        "cut-data.tar": "bad_tar",
    }
    detail = tar_run.records["cut-data.tar/s2.jpg"]["reject_detail"]
    assert "cut-data.tar ends before cut-data.tar/s2.jpg" in detail
    assert "unexpected end of data" in tar_run.records["cut-data.tar"]["reject_detail"]
    assert tar_run.images(*rows) == {"cut-data.tar/s1.jpg": RED}

    rows = ("cut-header.tar/s1.jpg", "cut-header.tar")
    assert tar_run.outcomes(*rows) == {"cut-header.tar/s1.jpg": "ok", "cut-header.tar": "bad_tar"}
    assert tar_run.records["cut-header.tar"]["reject_detail"].startswith(
        f"truncated or corrupt: no valid member header at byte {SECOND_HEADER}"
    )
    assert tar_run.images(*rows) == {"cut-header.tar/s1.jpg": RED}

    assert tar_run.reasons("bad_tar", "unreadable") == {"bad_tar": 2, "unreadable": 1}
    rows = ("good.tar/g1.jpg", "good.tar/g2.jpg")
    assert tar_run.outcomes(*rows) == {"good.tar/g1.jpg": "ok", "good.tar/g2.jpg": "ok"}
    assert tar_run.images(*rows) == {"good.tar/g1.jpg": BLUE, "good.tar/g2.jpg": RED}
    assert tar_run.records["good.tar/g1.jpg"]["captions"] == {"original": "caption of g1"}


def test_link_special_and_stray_caption_members_are_counted(tar_run):
    """Defect 12: SYMTYPE/LNKTYPE/FIFOTYPE members and captions not next to their image."""
    rows = tuple(f"links.tar/k{number}.jpg" for number in (1, 2, 3, 4, 6, 7))
    assert tar_run.outcomes(*rows) == {
        "links.tar/k1.jpg": "ok",
        "links.tar/k2.jpg": "symlink_not_followed",
        "links.tar/k3.jpg": "ok",
        "links.tar/k4.jpg": "not_regular_file",
        "links.tar/k6.jpg": "ok",
        "links.tar/k7.jpg": "ok",
    }
    assert tar_run.reasons("symlink_not_followed", "not_regular_file") == {
        "symlink_not_followed": 1,
        "not_regular_file": 1,
    }
    assert tar_run.manifest["inputs"]["ignored_captions"] == {"not_next_to_an_image": 2}
    assert tar_run.records["links.tar/k1.jpg"]["captions"] == {"original": "caption of k1"}
    assert tar_run.records["links.tar/k6.jpg"]["captions"] is None
    assert tar_run.images(*rows) == {
        "links.tar/k1.jpg": RED,
        "links.tar/k3.jpg": RED,
        "links.tar/k6.jpg": BLUE,
        "links.tar/k7.jpg": RED,
    }


def test_symlinks_out_of_the_source_root_are_rejected_unread(folder_run):
    """Defect 13: ``ln -s ../out/s.jpg l.jpg; ln -s /etc/passwd p.jpg``; a link inside the root is read."""
    rows = ("a.jpg", "in.jpg", "l.jpg", "p.jpg")
    assert folder_run.outcomes(*rows) == {
        "a.jpg": "ok",
        "in.jpg": "ok",
        "l.jpg": "symlink_escape",
        "p.jpg": "symlink_escape",
    }
    assert folder_run.reasons("symlink_escape") == {"symlink_escape": 2}
    assert "/etc/passwd, outside the source root" in folder_run.records["p.jpg"]["reject_detail"]
    assert folder_run.records["p.jpg"]["sha256"] is None and folder_run.records["l.jpg"]["sha256"] is None
    assert folder_run.images(*rows) == {"a.jpg": RED, "in.jpg": RED}
