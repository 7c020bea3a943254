"""Aspect-ratio buckets (NovelAI scheme) and the rule that rejects images no bucket fits.

A bucket is a training resolution ``(width, height)``: both sides multiples of ``step``, area at most
``resolution**2``. For every width from ``min_side`` to ``max_side`` the bucket takes the largest height
that keeps the area under the limit (capped at ``max_side``); the same pairs with the sides swapped and
the square ``resolution x resolution`` complete the symmetric set.

An image goes to the bucket whose aspect ratio is nearest in log space. Its **aspect error** is
``|log(ar_image / ar_bucket)|`` with ``ar = width / height``: symmetric in width and height, 0 for an
exact fit, and ``exp(error) - 1`` is the share of the longer side that a centre crop removes
(0.1 ~ 10 %).
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from infu.records import RejectReason

DEFAULT_MAX_ASPECT_ERROR = 0.2
"""Reject when the crop to the nearest bucket would cut > ~18 % of the longer side (log error 0.2).

Inside the bucket range (1:8 to 8:1 for FLUX at 1024) adjacent buckets are at most ~0.22 apart in log
space, so only images outside that range or in its sparse extremes exceed it."""


class BucketAssignment(NamedTuple):
    width: int
    height: int
    aspect_error: float


def make_buckets(
    resolution: int = 1024, min_side: int = 256, max_side: int = 2048, step: int = 64
) -> list[tuple[int, int]]:
    """The sorted, de-duplicated bucket list for a ``resolution x resolution`` pixel budget."""
    if resolution % step or min_side % step or max_side % step:
        raise ValueError(f"resolution, min_side and max_side must be multiples of step={step}")
    if not 0 < min_side <= resolution <= max_side:
        raise ValueError(
            f"need 0 < min_side <= resolution <= max_side, got {min_side}, {resolution}, {max_side}"
        )
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


class _BucketTable(NamedTuple):
    """Buckets with distinct aspect ratios, sorted by log aspect ratio."""

    widths: np.ndarray
    heights: np.ndarray
    log_ratios: np.ndarray


def _bucket_table(buckets: list[tuple[int, int]]) -> _BucketTable:
    """Sort by aspect ratio; of buckets sharing a ratio keep the largest (the others are never nearest)."""
    by_ratio: dict[Fraction, tuple[int, int]] = {}
    for width, height in buckets:
        ratio = Fraction(width, height)
        if ratio not in by_ratio or width * height > by_ratio[ratio][0] * by_ratio[ratio][1]:
            by_ratio[ratio] = (width, height)
    ordered = [by_ratio[ratio] for ratio in sorted(by_ratio)]
    widths = np.array([w for w, _ in ordered], dtype=np.int32)
    heights = np.array([h for _, h in ordered], dtype=np.int32)
    return _BucketTable(widths, heights, np.log(widths.astype(np.float64) / heights))


def assign_buckets(
    widths: npt.ArrayLike, heights: npt.ArrayLike, buckets: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest bucket per image: ``(bucket_widths int32, bucket_heights int32, aspect_errors float64)``.

    O(n log B) with a binary search over the sorted bucket ratios; a tie goes to the wider bucket.
    """
    table = _bucket_table(buckets)
    image_widths = np.asarray(widths, dtype=np.float64)
    image_heights = np.asarray(heights, dtype=np.float64)
    if np.any(image_widths <= 0) or np.any(image_heights <= 0):
        raise ValueError("image sides must be positive")
    log_ratios = np.log(image_widths / image_heights)
    upper = np.clip(np.searchsorted(table.log_ratios, log_ratios), 1, len(table.log_ratios) - 1)
    lower = upper - 1
    if len(table.log_ratios) == 1:
        upper = lower = np.zeros_like(upper)
    lower_error = np.abs(log_ratios - table.log_ratios[lower])
    upper_error = np.abs(log_ratios - table.log_ratios[upper])
    nearest = np.where(upper_error <= lower_error, upper, lower)
    errors = np.minimum(lower_error, upper_error)
    return table.widths[nearest], table.heights[nearest], errors


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> BucketAssignment:
    """Nearest bucket of one image (same rule as :func:`assign_buckets`)."""
    bucket_widths, bucket_heights, errors = assign_buckets([width], [height], buckets)
    return BucketAssignment(int(bucket_widths[0]), int(bucket_heights[0]), float(errors[0]))


def aspect_rejection(
    assignment: BucketAssignment, max_aspect_error: float = DEFAULT_MAX_ASPECT_ERROR
) -> tuple[RejectReason, str] | None:
    """``(aspect_ratio, detail)`` when the image fits its nearest bucket too badly, else None."""
    if assignment.aspect_error <= max_aspect_error:
        return None
    detail = (
        f"aspect error {assignment.aspect_error:.3f} > {max_aspect_error} "
        f"(nearest bucket {assignment.width}x{assignment.height})"
    )
    return RejectReason.ASPECT_RATIO, detail
