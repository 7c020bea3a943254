"""Exact (sha256) and near (perceptual hash) duplicate detection.

:func:`phash` runs per image in the workers; :func:`find_duplicates` runs once on the driver over the
whole index. Near duplicates are found with block tables, a form of multi-index hashing (Manku et al.,
"Detecting Near-Duplicates for Web Crawling", WWW 2007): cut the 64 bits into ``b > d`` blocks; two
hashes within Hamming distance ``d`` differ in at most ``d`` blocks, so they agree exactly on some
``b - d`` of them. One table per choice of ``b - d`` blocks sorts the hashes by those bits; only hashes
with equal keys become candidates, verified with a popcount. With ``d = 3`` and ``b = 4`` this is the
classic "one of four 16-bit bands matches". The work is ``C(b, d)`` sorts plus the candidates, never
n^2 (``b`` is chosen from n so chance collisions stay rare).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import scipy.fft
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
DEFAULT_MAX_DISTANCE = 4
"""Largest Hamming distance between the pHashes of near duplicates. Measured on the sample corpus:
0.3-0.8x resized, re-encoded copies 0, a tiled-text watermark overlay 2, different photos 22-40."""

_DCT_SIZE = 32
_LOW_FREQUENCIES = 8
_UINT64_MASK = (1 << HASH_BITS) - 1
_SORT_COST = 32.0
_MAX_TABLES = 1000
_PAIR_CHUNK = 1 << 22


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash as a signed int64-compatible Python int.

    Grayscale, resize to 32x32 (Lanczos), orthonormal 2-D DCT-II, keep the 8x8 lowest frequencies
    *after* the DC row and column (coefficients ``[1:9, 1:9]``: the DC term only measures brightness),
    one bit per coefficient: 1 when above the median of the 64. Bit layout: coefficient ``(u, v)``
    (``u`` vertical, ``v`` horizontal frequency, 1..8) sets bit ``63 - (8 * (u - 1) + (v - 1))``, so
    the most significant bit is ``(1, 1)``; the unsigned value is then read as two's-complement int64
    (``[-2**63, 2**63)``, storable in Arrow/DuckDB int64). The caller passes the upright image (EXIF
    orientation applied, e.g. :func:`infu.images.load_rgb`).
    """
    gray = image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    low = scipy.fft.dctn(pixels, type=2, norm="ortho")[1 : _LOW_FREQUENCIES + 1, 1 : _LOW_FREQUENCIES + 1]
    bits = (low > np.median(low)).ravel()
    unsigned = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return unsigned - (1 << HASH_BITS) if unsigned >> (HASH_BITS - 1) else unsigned


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes (signed or unsigned form)."""
    return ((a ^ b) & _UINT64_MASK).bit_count()


def _as_uint64(phashes: npt.ArrayLike) -> np.ndarray:
    return np.asarray(phashes, dtype=np.int64).view(np.uint64)


class NearPairs(NamedTuple):
    """Near-duplicate pairs ``(i, j)`` with ``i < j`` (positions in the input) and the work done."""

    pairs: np.ndarray
    """(k, 2) int64, sorted."""
    distances: np.ndarray
    """(k,) Hamming distance of each pair."""
    candidates: int
    """Candidate pairs verified by popcount (brute force would verify n (n - 1) / 2)."""
    blocks: int


def _block_masks(blocks: int) -> list[int]:
    """Bit masks of ``blocks`` contiguous blocks covering the 64 bits, widths as equal as possible."""
    masks, start = [], 0
    for index in range(blocks):
        width = HASH_BITS // blocks + (1 if index < HASH_BITS % blocks else 0)
        masks.append(((1 << width) - 1) << start)
        start += width
    return masks


def _table_keys(blocks: int, max_distance: int) -> list[int]:
    """One mask per table: the union of ``blocks - max_distance`` blocks, every such choice once."""
    masks = _block_masks(blocks)
    return [sum(chosen) for chosen in combinations(masks, blocks - max_distance)]


def choose_blocks(count: int, max_distance: int) -> int:
    """Block count minimising the expected work for ``count`` uniformly spread hashes.

    Per table: a sort (weighted ``_SORT_COST`` per hash) plus the chance collisions of its key,
    ``count**2 / 2 / 2**key_bits``. More blocks make longer keys but ``C(blocks, max_distance)`` tables.
    """

    def cost(blocks: int) -> float:
        keys = _table_keys(blocks, max_distance)
        key_bits = min(key.bit_count() for key in keys)
        return len(keys) * (_SORT_COST * count + count * count / 2.0 / 2.0**key_bits)

    options = [
        blocks
        for blocks in range(max_distance + 1, HASH_BITS + 1)
        if math.comb(blocks, max_distance) <= _MAX_TABLES
    ]
    return min(options, key=cost)


def _pairs_in_runs(order: np.ndarray, sorted_keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of positions whose keys are equal, in chunks of about ``_PAIR_CHUNK`` pairs."""
    run_starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_ends = np.r_[run_starts[1:], len(sorted_keys)]
    run_end_of = np.repeat(run_ends, run_ends - run_starts)
    later = run_end_of - 1 - np.arange(len(sorted_keys))
    total = np.cumsum(later)
    if not len(total) or not total[-1]:
        return
    cuts = np.searchsorted(total, np.arange(_PAIR_CHUNK, total[-1], _PAIR_CHUNK), side="right")
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(later)], strict=True):
        counts = later[start:stop]
        pair_count = int(counts.sum())
        if not pair_count:
            continue
        first = np.repeat(np.arange(start, stop), counts)
        second = first + 1 + np.arange(pair_count) - np.repeat(np.cumsum(counts) - counts, counts)
        yield order[first], order[second]


def table_masks(count: int, max_distance: int, blocks: int | None = None) -> list[int]:
    """Key masks of the block tables for ``count`` hashes (``blocks`` defaults to :func:`choose_blocks`)."""
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS}), got {max_distance}")
    blocks = blocks or choose_blocks(count, max_distance)
    if blocks <= max_distance:
        raise ValueError(f"blocks must exceed max_distance ({max_distance}), got {blocks}")
    return _table_keys(blocks, max_distance)


def pairs_in_tables(
    phashes: npt.ArrayLike, masks: Sequence[int], max_distance: int
) -> tuple[np.ndarray, int]:
    """Pairs within ``max_distance`` bits that agree on the bits of one of ``masks``, coded ``i * n + j``
    (``i < j``, unique), and the number of candidates verified. The tables are independent, so disjoint
    subsets of :func:`table_masks` can run in separate processes and their codes be merged."""
    hashes = _as_uint64(phashes)
    count = len(hashes)
    found: list[np.ndarray] = []
    candidates = 0
    for key_mask in masks:
        keys = hashes & np.uint64(key_mask)
        order = np.argsort(keys, kind="stable")
        # A stable sort keeps equal keys in input order, so every pair comes out as (i, j) with i < j.
        for first, second in _pairs_in_runs(order, keys[order]):
            candidates += len(first)
            close = np.bitwise_count(hashes[first] ^ hashes[second]) <= max_distance
            found.append(first[close] * count + second[close])
    return (np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)), candidates


def near_duplicate_pairs(
    phashes: npt.ArrayLike, max_distance: int = DEFAULT_MAX_DISTANCE, blocks: int | None = None
) -> NearPairs:
    """All pairs of hashes within ``max_distance`` bits, by block tables (see the module doc).

    ``blocks`` defaults to :func:`choose_blocks`. Memory stays bounded by ``_PAIR_CHUNK`` candidates
    beside one sort of the hashes. Identical hashes are found like any other pair: collapse them first
    (as :func:`find_duplicates` does) when large groups of equal hashes are expected.
    """
    hashes = _as_uint64(phashes)
    blocks = blocks or choose_blocks(len(hashes), max_distance)
    codes, candidates = pairs_in_tables(hashes, table_masks(len(hashes), max_distance, blocks), max_distance)
    return NearPairs(*pairs_from_codes(hashes, codes), candidates, blocks)


def pairs_from_codes(phashes: npt.ArrayLike, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair codes of :func:`pairs_in_tables` -> sorted ``(k, 2)`` positions and their Hamming distances."""
    hashes = _as_uint64(phashes)
    count = max(len(hashes), 1)
    pairs = np.stack([codes // count, codes % count], axis=1)
    return pairs, np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(np.int64)


def _first_of_equal(values: pa.Array) -> np.ndarray:
    """Per position, the first position holding an equal value (-1 where null)."""
    indices = pc.dictionary_encode(values).indices
    codes = indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = np.flatnonzero(codes >= 0)
    first_position = np.full(len(values), -1, dtype=np.int64)
    if len(valid):
        unique_codes, first_index = np.unique(codes[valid], return_index=True)
        first_of_code = np.empty(int(unique_codes[-1]) + 1, dtype=np.int64)
        first_of_code[unique_codes] = valid[first_index]
        first_position[valid] = first_of_code[codes[valid]]
    return first_position


def find_duplicates(
    keys: Sequence[str],
    sha256s: Sequence[str | None],
    phashes: Sequence[int | None] | npt.ArrayLike,
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> dict[str, tuple[str, str]]:
    """Duplicates to reject: ``{key: (reason_detail, kept_key)}``; the first key in input order is kept.

    Exact duplicates share a sha256 (detail ``"same sha256 as <kept>"``); near duplicates have pHashes
    within ``max_distance`` bits (``"phash distance <d> to <kept>"``, measured to the kept image; one
    linked to it only through members without a pHash: ``"near-duplicate chain to <kept>"``). Groups
    are the connected components of both relations, so a chain of near duplicates forms one group even
    when its ends are further apart. A missing sha256 or pHash (None) takes no part in that relation.
    """
    count = len(keys)
    if not len(sha256s) == len(phashes) == count:
        raise ValueError(
            f"keys, sha256s and phashes differ in length: {count}, {len(sha256s)}, {len(phashes)}"
        )
    positions = np.arange(count)
    sha_column = pa.array(sha256s, type=pa.string())
    hash_column = pa.array(phashes, type=pa.int64())
    hashes = _as_uint64(hash_column.fill_null(0).to_numpy(zero_copy_only=False))
    has_hash = hash_column.is_valid().to_numpy(zero_copy_only=False)
    # Equal sha256s and equal pHashes link to their first occurrence; only distinct pHashes are searched.
    same_sha_as = _first_of_equal(sha_column)
    same_hash_as = _first_of_equal(hash_column)
    distinct_hashes = np.flatnonzero(same_hash_as == positions)
    near = near_duplicate_pairs(hashes[distinct_hashes], max_distance)
    sources = np.concatenate([positions, positions, distinct_hashes[near.pairs[:, 0]]])
    targets = np.concatenate([same_sha_as, same_hash_as, distinct_hashes[near.pairs[:, 1]]])
    linked = (targets >= 0) & (targets != sources)
    marked, kept = keep_first(sources[linked], targets[linked])
    exact = (same_sha_as[marked] == kept) & (same_sha_as[marked] >= 0)
    relations = duplicate_relations(exact, hashes[marked] ^ hashes[kept], has_hash[marked] & has_hash[kept])
    return {
        keys[index]: (f"{relation} {keys[kept_index]}", keys[kept_index])
        for index, kept_index, relation in zip(marked, kept, relations, strict=True)
    }


def keep_first(sources: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups = connected components of the links ``sources[i] - targets[i]`` (node numbers in keep
    order); returns every node that is not the first of its group, ascending, and that first node.

    Only linked nodes are materialised, so the work follows the number of links, not the node ids."""
    nodes, ends = np.unique(np.concatenate([sources, targets]), return_inverse=True)
    graph = coo_matrix(
        (np.ones(len(sources), dtype=np.int8), (ends[: len(sources)], ends[len(sources) :])),
        shape=(len(nodes), len(nodes)),
    )
    _, components = connected_components(graph, directed=False)
    # Nodes are sorted, so the first occurrence of each component is its smallest node.
    _, first_index = np.unique(components, return_index=True)
    kept = nodes[first_index][components]
    marked = kept != nodes
    return nodes[marked], kept[marked]


def duplicate_relations(exact: np.ndarray, differing_bits: np.ndarray, both_hashed: np.ndarray) -> list[str]:
    """Detail prefix per marked duplicate (the kept key follows): same sha256, the pHash distance to the
    kept image, or a chain through images without a pHash."""
    distances = np.bitwise_count(differing_bits).tolist()
    return [
        "same sha256 as"
        if is_exact
        else f"phash distance {distance} to"
        if hashed
        else "near-duplicate chain to"
        for is_exact, distance, hashed in zip(exact.tolist(), distances, both_hashed.tolist(), strict=True)
    ]
