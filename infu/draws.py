"""Draws that depend only on what they are about (a key, an index, an epoch), never on call order or
process: seeds and uniform numbers hashed from their parts."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate


def stable_uniform(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts`` (hashed with BLAKE2b): the same in every
    process and call order, unlike a seeded global RNG."""
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53  # 53 bits: exact in a float, never 1.0


def draw_seed(*parts: object) -> int:
    """A 53-bit seed (``torch.Generator``, ``numpy.random.default_rng``) depending only on ``parts``."""
    return int(stable_uniform(*parts) * 2**53)


def weighted_index(weights: Sequence[float], *parts: object) -> int:
    """An index into ``weights`` (non-negative, summing above 0) drawn in proportion to them by
    :func:`stable_uniform` of ``parts``."""
    bounds = list(accumulate(weights))
    target = stable_uniform(*parts) * bounds[-1]
    return min(bisect_right(bounds, target), len(bounds) - 1)  # a product rounded up still picks the last
