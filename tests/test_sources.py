"""Sample corpus, image probing and source adapters (no Ray needed)."""

from __future__ import annotations

import hashlib
import json

import pytest
import webdataset as wds

from filtering.config import SourceConfig
from filtering.sources import InputRejected, SourceError, open_source
from infu.images import BadImageError, decode_image, probe_image
from infu.sample_corpus import build_sample_corpus, corpus_digest, read_labels

VARIANTS_ASKED_FOR = {
    "portrait",
    "tiny_face",
    "two_people",
    "watermark",
    "grayscale",
    "cmyk",
    "exif_rotated",
    "very_small",
    "truncated",
    "not_image",
    "huge_header",
    "no_face",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(path)
    return path


def test_corpus_is_deterministic_and_labelled(corpus, tmp_path):
    build_sample_corpus(tmp_path)
    assert corpus_digest(tmp_path) == corpus_digest(corpus)
    labels = read_labels(corpus)
    assert {label.variant for label in labels} == VARIANTS_ASKED_FOR
    assert len([label for label in labels if label.variant == "portrait"]) == 7
    assert len({label.identity for label in labels if label.variant == "portrait"}) == 7
    for label in labels:
        assert (corpus / label.path).is_file()
    captions = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    assert {entry["path"] for entry in captions} <= {label.path for label in labels}
    assert len(captions) == 9


def test_probe_gives_each_variant_its_expected_ingest_outcome(corpus):
    for label in read_labels(corpus):
        data = (corpus / label.path).read_bytes()
        try:
            info = probe_image(data)
            outcome = "too_small" if min(info.width, info.height) < 64 else "ok"
        except BadImageError as error:
            outcome = error.reason
        assert outcome == label.expect_ingest, label.path


def test_decoding_normalises_orientation_and_colour(corpus):
    upright = decode_image((corpus / "people/person_5.jpg").read_bytes())
    rotated = decode_image((corpus / "variants/exif_rotated.jpg").read_bytes())
    assert rotated.size == upright.size == (376, 478)
    assert probe_image((corpus / "variants/exif_rotated.jpg").read_bytes()).orientation == 6
    for name in ("grayscale", "cmyk"):
        image = decode_image((corpus / f"variants/{name}.jpg").read_bytes())
        assert image.mode == "RGB"
    with pytest.raises(BadImageError) as error:
        probe_image((corpus / "variants/huge_header.png").read_bytes(), max_pixels=10**12)
    assert error.value.reason == "too_large"
    with pytest.raises(BadImageError, match="bad_image: empty file"):
        probe_image(b"")
    with pytest.raises(BadImageError, match="exceeds the 100-pixel limit"):
        probe_image((corpus / "people/person_0.jpg").read_bytes(), max_pixels=100)


def test_a_jpeg_decodes_at_the_smallest_dct_scale_covering_the_size_asked(corpus):
    upright = decode_image((corpus / "people/person_5.jpg").read_bytes(), min_size=(80, 100))
    rotated = decode_image((corpus / "variants/exif_rotated.jpg").read_bytes(), min_size=(80, 100))
    assert upright.size == rotated.size == (94, 120)  # 376 x 478 at 1/4: 1/8 would be under 100 high
    full = decode_image((corpus / "people/person_5.jpg").read_bytes())
    assert decode_image((corpus / "people/person_5.jpg").read_bytes(), min_size=(376, 478)).size == full.size


def test_folder_source_lists_images_with_captions_and_counts_the_rest(corpus):
    source = open_source(SourceConfig(kind="sample_corpus", path=corpus, dataset="sample"))
    items = list(source.iter_items())
    assert [item["source_path"] for item in items] == sorted(label.path for label in read_labels(corpus))
    by_path = {item["source_path"]: item for item in items}
    assert by_path["people/astronaut.png"]["caption"].startswith("an astronaut")
    assert by_path["variants/cmyk.jpg"]["caption"] is None
    assert source.read(by_path["people/person_0.jpg"]) == (corpus / "people/person_0.jpg").read_bytes()
    assert source.describe()["ignored_files"] == {"jsonl": 1}


def test_folder_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(SourceConfig(kind="folder", path=tmp_path / "absent", dataset="d"))
    (tmp_path / "captions.jsonl").write_text('{"path": "a.jpg"}\n')
    source = open_source(
        SourceConfig(kind="folder", path=tmp_path, dataset="d", captions=tmp_path / "captions.jsonl")
    )
    with pytest.raises(SourceError, match=r"captions.jsonl:1: expected"):
        list(source.iter_items())


def test_webdataset_source_reads_members_by_offset_with_captions(corpus, tmp_path):
    shards = tmp_path / "tars"
    shards.mkdir()
    files = {"a": "people/person_0.jpg", "b": "people/astronaut.png", "c": "variants/truncated.jpg"}
    for tar_name, keys in (("00000.tar", ["a", "b"]), ("00001.tar", ["c"])):
        with wds.TarWriter(str(shards / tar_name), encoder=False) as writer:
            for key in keys:
                extension = files[key].rsplit(".", 1)[-1]
                sample = {"__key__": f"dir/{key}", extension: (corpus / files[key]).read_bytes()}
                if key == "a":
                    sample["txt"] = b"caption from txt"
                if key == "b":
                    sample["json"] = json.dumps({"caption": "caption from json"}).encode()
                    sample["cls"] = b"3"
                writer.write(sample)
    source = open_source(SourceConfig(kind="webdataset", path=shards, dataset="wds"))
    items = list(source.iter_items())
    assert [item["source_path"] for item in items] == [
        "00000.tar/dir/a.jpg",
        "00000.tar/dir/b.png",
        "00001.tar/dir/c.jpg",
    ]
    assert [item["caption"] for item in items] == ["caption from txt", "caption from json", None]
    for item, key in zip(items, "abc", strict=True):
        expected = (corpus / files[key]).read_bytes()
        assert hashlib.sha256(source.read(item)).digest() == hashlib.sha256(expected).digest()
    assert source.describe()["ignored_files"] == {"cls": 1}


def test_webdataset_source_errors_without_tars_and_rejects_a_compressed_one(tmp_path):
    with pytest.raises(SourceError, match="no .tar files"):
        list(open_source(SourceConfig(kind="webdataset", path=tmp_path, dataset="d")).iter_items())
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b not a tar")
    (item,) = open_source(SourceConfig(kind="webdataset", path=tmp_path, dataset="d")).iter_items()
    assert item["source_path"] == "x.tar"
    assert item["reject"]["reason"] == "bad_tar"
    assert "cannot be read as an uncompressed tar" in item["reject"]["detail"]


def test_folder_symlinks_follow_the_configured_policy(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "a.jpg").write_bytes(b"inside")
    (outside / "s.jpg").write_bytes(b"outside")
    (root / "in.jpg").symlink_to("real/a.jpg")
    (root / "out.jpg").symlink_to(outside / "s.jpg")
    (root / "linked").symlink_to("real")
    (root / "away").symlink_to(outside)

    def outcomes(policy):
        source = open_source(SourceConfig(kind="folder", path=root, dataset="d", symlinks=policy))
        result = {}
        for item in source.iter_items():
            try:
                result[item["source_path"]] = (
                    item["reject"]["reason"] if "reject" in item else source.read(item)
                )
            except InputRejected as error:
                result[item["source_path"]] = error.reason
        return result

    assert outcomes("inside") == {
        "in.jpg": b"inside",
        "out.jpg": "symlink_escape",
        "away": "symlink_escape",
        "linked/a.jpg": b"inside",
        "real/a.jpg": b"inside",
    }
    assert outcomes("never") == {
        "in.jpg": "symlink_not_followed",
        "out.jpg": "symlink_not_followed",
        "away": "symlink_not_followed",
        "linked": "symlink_not_followed",
        "real/a.jpg": b"inside",
    }
    assert outcomes("follow") == {
        "in.jpg": b"inside",
        "out.jpg": b"outside",
        "away/s.jpg": b"outside",
        "linked/a.jpg": b"inside",
        "real/a.jpg": b"inside",
    }
