"""Aspect-ratio buckets: the NovelAI bucket set for FLUX at 1024 and nearest-ratio assignment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from filtering.buckets import (
    BucketAssignment,
    aspect_rejection,
    assign_bucket,
    assign_buckets,
    make_buckets,
)
from infu.records import RejectReason

RESOLUTION = 1024


@pytest.fixture(scope="module")
def buckets() -> list[tuple[int, int]]:
    return make_buckets(RESOLUTION)


def test_bucket_set_shape(buckets):
    assert (RESOLUTION, RESOLUTION) in buckets
    assert buckets == sorted(set(buckets))
    assert len(buckets) == 41
    for width, height in buckets:
        assert width * height <= RESOLUTION * RESOLUTION
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= min(width, height) and max(width, height) <= 2048
    assert {(h, w) for w, h in buckets} == set(buckets)
    assert buckets[0] == (256, 2048) and buckets[-1] == (2048, 512)


def test_each_width_gets_its_largest_height(buckets):
    for width in range(256, 2049, 64):
        height = min(2048, RESOLUTION * RESOLUTION // width // 64 * 64)
        assert (width, height) in buckets
        assert height == 2048 or width * (height + 64) > RESOLUTION * RESOLUTION


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="multiples"):
        make_buckets(1000)
    with pytest.raises(ValueError, match="min_side <= resolution"):
        make_buckets(1024, min_side=2048, max_side=4096)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((864, 1152), (896, 1152)),  # 3:4 -> 0.778 (832x1216 is 0.684, further in log space)
        ((1152, 864), (1152, 896)),
        ((1000, 1000), (1024, 1024)),
        ((1920, 1080), (1344, 768)),  # 16:9 -> 7:4
        ((1080, 1920), (768, 1344)),
        ((250, 250), (1024, 1024)),  # small images still get the full-size bucket
    ],
)
def test_nearest_ratio(buckets, size, bucket):
    assignment = assign_bucket(*size, buckets)
    assert isinstance(assignment, BucketAssignment)
    assert (assignment.width, assignment.height) == bucket
    expected = abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))
    assert assignment.aspect_error == pytest.approx(expected)
    assert aspect_rejection(assignment) is None


def test_three_four_error_value(buckets):
    assert assign_bucket(864, 1152, buckets).aspect_error == pytest.approx(math.log((896 / 1152) / 0.75))


def test_extreme_ratio_is_rejected(buckets):
    assignment = assign_bucket(4000, 200, buckets)
    assert (assignment.width, assignment.height) == (2048, 256)
    assert assignment.aspect_error == pytest.approx(math.log(20 / 8))
    reason, detail = aspect_rejection(assignment)
    assert reason is RejectReason.ASPECT_RATIO
    assert "0.916" in detail and "2048x256" in detail
    assert aspect_rejection(assignment, max_aspect_error=1.0) is None


def test_vectorised_equals_scalar(buckets):
    rng = np.random.default_rng(7)
    widths = rng.integers(16, 6000, size=500)
    heights = rng.integers(16, 6000, size=500)
    bucket_widths, bucket_heights, errors = assign_buckets(widths, heights, buckets)
    assert bucket_widths.dtype == np.int32 and errors.dtype == np.float64
    for index in range(len(widths)):
        scalar = assign_bucket(int(widths[index]), int(heights[index]), buckets)
        assert scalar == (bucket_widths[index], bucket_heights[index], errors[index])
    assert errors.max() > 0.2 and np.median(errors) < 0.07


def test_error_is_symmetric_in_orientation(buckets):
    rng = np.random.default_rng(3)
    widths, heights = rng.integers(64, 4096, size=(2, 200))
    wide = assign_buckets(widths, heights, buckets)
    tall = assign_buckets(heights, widths, buckets)
    np.testing.assert_allclose(wide[2], tall[2], atol=1e-12)


def test_non_positive_sides_are_refused(buckets):
    with pytest.raises(ValueError, match="positive"):
        assign_buckets([0], [10], buckets)
