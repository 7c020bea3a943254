"""Duplicates: pHash on real photos of the sample corpus, the block-table search and keep-first groups."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filtering.dedup import (
    choose_blocks,
    find_duplicates,
    hamming,
    near_duplicate_pairs,
    phash,
)
from infu.images import load_rgb
from infu.sample_corpus import build_sample_corpus

PEOPLE = [f"people/person_{index}.jpg" for index in range(6)] + ["people/astronaut.png"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(root)
    # Exact copy and a 0.8x resized, re-encoded copy of person_0.
    shutil.copyfile(root / "people/person_0.jpg", root / "copy_of_person_0.jpg")
    original = Image.open(root / "people/person_0.jpg")
    smaller = original.resize(
        (round(original.width * 0.8), round(original.height * 0.8)), Image.Resampling.BILINEAR
    )
    smaller.save(root / "person_0_small.jpg", quality=80)
    return root


def _hash(corpus: Path, name: str) -> int:
    return phash(load_rgb(corpus / name, 1 << 26))


def test_phash_is_a_signed_64_bit_value(corpus):
    value = _hash(corpus, "people/person_0.jpg")
    assert -(2**63) <= value < 2**63
    assert np.array([value], dtype=np.int64)[0] == value
    assert value == _hash(corpus, "copy_of_person_0.jpg")


def test_most_significant_bit_is_the_first_ac_coefficient():
    """A pattern made of DCT basis (1, 1) sets bit 63 (the sign of the int64); its negative clears it."""
    x = np.arange(256)
    wave = np.cos(np.pi * (2 * x + 1) / 512)
    pattern = 128 + 100 * np.outer(wave, wave)
    assert phash(Image.fromarray(pattern.astype(np.uint8))) < 0
    assert phash(Image.fromarray((255 - pattern).astype(np.uint8))) >= 0


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0, -1) == 64
    assert hamming(-(2**63), 0) == 1
    assert hamming(0b1011, 0b0001) == 2 == hamming(0b0001, 0b1011)


def test_resized_reencoded_copy_is_near_and_other_people_are_far(corpus):
    original = _hash(corpus, "people/person_0.jpg")
    assert hamming(original, _hash(corpus, "person_0_small.jpg")) <= 2  # measured 0
    others = [hamming(original, _hash(corpus, name)) for name in PEOPLE[1:]]
    assert min(others) >= 20  # measured 26-40
    hashes = [_hash(corpus, name) for name in PEOPLE]
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) >= 20  # measured 24


def test_phash_sees_luminance_only_and_the_corpus_variants_are_not_near_duplicates(corpus):
    """Grayscale/CMYK copies hash like the original; the corpus' variants are mirrored, hence far."""
    original = Image.open(corpus / "people/person_3.jpg")
    assert hamming(phash(original), phash(original.convert("L"))) == 0
    assert hamming(phash(original), phash(original.convert("CMYK").convert("RGB"))) <= 2
    for person, variant in (("person_3", "grayscale"), ("person_4", "cmyk"), ("person_5", "exif_rotated")):
        assert hamming(_hash(corpus, f"people/{person}.jpg"), _hash(corpus, f"variants/{variant}.jpg")) >= 16
    assert hamming(_hash(corpus, "people/person_2.jpg"), _hash(corpus, "variants/watermark.jpg")) <= 4


def test_find_duplicates_on_the_corpus(corpus):
    names = [*PEOPLE, "copy_of_person_0.jpg", "person_0_small.jpg"]
    sha256s = [hashlib.sha256((corpus / name).read_bytes()).hexdigest() for name in names]
    hashes = [_hash(corpus, name) for name in names]
    duplicates = find_duplicates(names, sha256s, hashes)
    assert duplicates == {
        "copy_of_person_0.jpg": ("same sha256 as people/person_0.jpg", "people/person_0.jpg"),
        "person_0_small.jpg": ("phash distance 0 to people/person_0.jpg", "people/person_0.jpg"),
    }
    reversed_duplicates = find_duplicates(names[::-1], sha256s[::-1], hashes[::-1])
    assert set(reversed_duplicates) == {"copy_of_person_0.jpg", "people/person_0.jpg"}
    assert {kept for _, kept in reversed_duplicates.values()} == {"person_0_small.jpg"}


def test_keep_first_groups_and_missing_values():
    keys = ["a", "b", "c", "d", "e", "f", "g"]
    sha256s = ["s1", "s2", "s1", None, "s3", "s4", None]
    hashes = [0, 1 << 40, 0, 0b11, 2**63 - 1, None, None]
    assert find_duplicates(keys, sha256s, hashes, max_distance=2) == {
        "b": ("phash distance 1 to a", "a"),
        "c": ("same sha256 as a", "a"),
        "d": ("phash distance 2 to a", "a"),
    }
    assert find_duplicates(keys, sha256s, hashes, max_distance=0) == {"c": ("same sha256 as a", "a")}
    assert find_duplicates([], [], []) == {}
    with pytest.raises(ValueError, match="differ in length"):
        find_duplicates(["a"], [], [])


def test_chain_through_an_image_without_phash():
    """a has no pHash but b has its bytes; c is near b, so it joins a's group through b."""
    keys, sha256s, hashes = ["a", "b", "c"], ["s", "s", "t"], [None, 5, 5 ^ 1]
    assert find_duplicates(keys, sha256s, hashes) == {
        "b": ("same sha256 as a", "a"),
        "c": ("near-duplicate chain to a", "a"),
    }


def _planted(count: int, planted: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Random hashes; hash ``count - planted + k`` is hash ``k`` with 0-6 random bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64, endpoint=True)
    unsigned = hashes.view(np.uint64)
    pairs = []
    for source in range(planted):
        flips = rng.choice(64, size=rng.integers(0, 7), replace=False)
        target = count - planted + source
        unsigned[target] = unsigned[source] ^ np.uint64(sum(1 << int(bit) for bit in flips))
        pairs.append((source, target))
    return hashes, pairs


@pytest.mark.parametrize("max_distance", [0, 1, 3, 4, 6])
def test_block_tables_match_brute_force(max_distance):
    hashes, _ = _planted(1500, 300, seed=max_distance)
    unsigned = hashes.view(np.uint64)
    distances = np.bitwise_count(unsigned[:, None] ^ unsigned[None, :])
    expected = np.argwhere(np.triu(distances <= max_distance, 1))
    for blocks in (None, max_distance + 1, max_distance + 3):
        found = near_duplicate_pairs(hashes, max_distance, blocks=blocks)
        np.testing.assert_array_equal(found.pairs, expected)
        np.testing.assert_array_equal(found.distances, distances[expected[:, 0], expected[:, 1]])


def test_too_few_blocks_are_refused():
    with pytest.raises(ValueError, match="blocks must exceed"):
        near_duplicate_pairs(np.zeros(3, dtype=np.int64), 3, blocks=3)


def test_block_count_grows_with_the_index():
    assert choose_blocks(200_000, 3) == 4  # four 16-bit bands
    assert choose_blocks(10_000_000, 4) > choose_blocks(1000, 4) == 5
    assert choose_blocks(10, 0) == 1


def test_200k_hashes_are_not_compared_quadratically():
    count = 200_000
    hashes, planted = _planted(count, 1000, seed=11)
    found = near_duplicate_pairs(hashes, 4)
    assert found.candidates < count * count / 2 / 1000  # measured ~1.5e7 vs 2e10
    planted_close = {pair for pair in planted if hamming(int(hashes[pair[0]]), int(hashes[pair[1]])) <= 4}
    assert planted_close <= set(map(tuple, found.pairs.tolist()))
    keys = [f"k{index:06d}" for index in range(count)]
    sha256s = [f"sha{index}" for index in range(count - 10)] + ["sha0"] * 10
    duplicates = find_duplicates(keys, sha256s, hashes, max_distance=4)
    assert {keys[target] for _, target in planted_close} <= set(duplicates)
    assert all(duplicates[keys[index]][1] == "k000000" for index in range(count - 10, count))
