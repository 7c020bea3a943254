"""Model-free parts of the face stack: alignment, similarity, head pose maths, control image, pose photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
from insightface.utils.face_align import estimate_norm
from PIL import Image

from infu.face import (
    ARCFACE_TEMPLATE,
    Face,
    HeadPose,
    align_face,
    black_control,
    cosine_similarity,
    draw_keypoints_control,
    id_loss,
    largest_face,
    resize_and_pad_image,
)
from infu.face.align import alignment_matrix, similarity_transform
from infu.face.pose import five_keypoints, generic_face_3d, head_pose, rotation_to_pose


def _similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift)[:, None]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _face(box: tuple[float, float, float, float]) -> Face:
    return Face(
        bbox=np.array(box, dtype=np.float32),
        score=1.0,
        kps=np.zeros((5, 2), np.float32),
        embedding=np.ones(4, np.float32) / 2,
        pose=None,
    )


@pytest.fixture(scope="module")
def face_crop() -> np.ndarray:
    """A real 112x112 RGB crop (the astronaut's face, from scikit-image)."""
    return cv2.resize(skimage.data.astronaut()[60:190, 160:290], (112, 112), interpolation=cv2.INTER_AREA)


def test_keypoints_already_on_the_template_leave_the_image_unchanged(face_crop):
    assert np.allclose(alignment_matrix(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    aligned = align_face(face_crop, ARCFACE_TEMPLATE)
    assert aligned.shape == (112, 112, 3)
    assert np.abs(aligned.astype(int) - face_crop.astype(int)).max() <= 1


def test_alignment_undoes_a_rotation_scale_and_shift(face_crop):
    warp = _similarity(2.1, 27.0, (150.0, 40.0))
    scene = cv2.warpAffine(face_crop, warp, (400, 400), flags=cv2.INTER_CUBIC)
    aligned = align_face(scene, _apply(warp, ARCFACE_TEMPLATE))
    inner = (slice(8, 104), slice(8, 104))
    assert np.abs(aligned[inner].astype(float) - face_crop[inner].astype(float)).mean() < 4.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface calls a deprecated skimage API
def test_similarity_transform_recovers_a_known_transform_and_matches_insightface():
    warp = _similarity(0.37, -12.0, (-20.0, 310.0))
    assert np.allclose(
        similarity_transform(ARCFACE_TEMPLATE, _apply(warp, ARCFACE_TEMPLATE)), warp, atol=1e-9
    )
    kps = _apply(_similarity(3.0, 8.0, (500.0, 200.0)), ARCFACE_TEMPLATE) + np.random.default_rng(0).normal(
        0, 2.0, (5, 2)
    )
    for size in (112, 224, 128):
        assert np.allclose(
            alignment_matrix(kps, size), estimate_norm(kps.astype(np.float32), size), atol=1e-4
        )


def test_cosine_similarity_and_id_loss():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([-3.0, 0.0, 1.0])
    assert cosine_similarity(a, 5 * a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity(a, b) == pytest.approx(0.0)
    assert cosine_similarity(a, np.zeros(3)) == 0.0
    assert id_loss(a, 2 * a) == pytest.approx(0.0, abs=1e-6)
    assert id_loss(a, b) == pytest.approx(1.0)
    assert id_loss(a, -a) == pytest.approx(2.0)
    assert id_loss([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 - np.sqrt(0.5))


def test_largest_face_is_the_biggest_box():
    faces = [_face((0, 0, 10, 10)), _face((50, 50, 90, 80)), _face((0, 0, 20, 20))]
    assert largest_face(faces) is faces[1]
    assert largest_face([]) is None


def test_five_keypoints_from_68_landmarks():
    landmarks = np.arange(136, dtype=np.float32).reshape(68, 2)
    kps = five_keypoints(landmarks)
    assert np.allclose(kps[0], landmarks[36:42].mean(axis=0))
    assert np.allclose(kps[1], landmarks[42:48].mean(axis=0))
    assert np.allclose(kps[2:], landmarks[[30, 48, 54]])


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation with the HeadPose sign conventions (camera axes: x right, y down, z away)."""
    y, p, r = np.radians([yaw, pitch, roll])
    turn = np.array([[np.cos(y), 0, -np.sin(y)], [0, 1, 0], [np.sin(y), 0, np.cos(y)]])
    nod = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    tilt = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return turn @ nod @ tilt


def _project(rotation: np.ndarray, centre: tuple[float, float], size: int = 800) -> np.ndarray:
    """The generic face turned by ``rotation`` relative to its line of sight, photographed at ``centre``."""
    focal = float(size)
    distance = 12.0
    ray = np.array([(centre[0] - size / 2) / focal, (centre[1] - size / 2) / focal, 1.0])
    ray /= np.linalg.norm(ray)
    axis = np.cross([0.0, 0.0, 1.0], ray)
    angle = np.arctan2(np.linalg.norm(axis), ray[2])
    view, _ = cv2.Rodrigues(axis / max(np.linalg.norm(axis), 1e-12) * angle)
    points = generic_face_3d() @ (view @ rotation).T + ray * distance
    return focal * points[:, :2] / points[:, 2:] + size / 2


def test_rotation_to_pose_sign_conventions():
    assert np.allclose(rotation_to_pose(np.eye(3)), (0, 0, 0))
    assert np.allclose(rotation_to_pose(_rotation(30, 0, 0)), (30, 0, 0))
    assert np.allclose(rotation_to_pose(_rotation(0, 20, 0)), (0, 20, 0))
    assert np.allclose(rotation_to_pose(_rotation(0, 0, 15)), (0, 0, 15))


@pytest.mark.parametrize(
    "pose", [(0, 0, 0), (35, 0, 0), (-50, 5, 0), (0, 20, 0), (0, -25, 10), (15, 10, -20)]
)
@pytest.mark.parametrize("centre", [(400, 400), (120, 650)])
def test_head_pose_recovers_the_pose_relative_to_the_line_of_sight(pose, centre):
    estimated = head_pose(_project(_rotation(*pose), centre), (800, 800))
    assert isinstance(estimated, HeadPose)
    assert np.allclose(estimated, pose, atol=0.5)


def _control_kps() -> np.ndarray:
    return np.array([[60, 60], [140, 60], [100, 100], [70, 150], [130, 150]], dtype=np.float32)


def test_control_image_draws_keypoints_and_dimmed_limbs():
    control = np.asarray(draw_keypoints_control((200, 220), _control_kps()))
    assert control.shape == (220, 200, 3)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(_control_kps().astype(int), colours, strict=True):
        assert tuple(control[y, x]) == colour
        assert tuple(control[y, x + 9]) == colour  # inside the radius-10 disc
    # limbs (from each point to the nose) in the point's colour x 0.6
    assert tuple(control[80, 80]) == (153, 0, 0)
    assert tuple(control[80, 120]) == (0, 153, 0)
    assert tuple(control[125, 85]) == (153, 153, 0)
    assert tuple(control[125, 115]) == (153, 0, 153)
    # black away from the drawing; a limb is a thin ellipse (stick width 4)
    assert not control[:40].any() and not control[170:].any() and not control[:, :40].any()
    assert not control[80, 88].any() and not control[80, 72].any()
    lit = control.any(axis=2).mean()
    assert 0.05 < lit < 0.25


def test_black_control_is_all_black():
    control = black_control((64, 48))
    assert control.size == (64, 48) and control.mode == "RGB"
    assert not np.asarray(control).any()


GREY = 100
MARK = (200, 40, 160)
WHITE = (255, 255, 255)


def _marked_photo(size: tuple[int, int], mark: tuple[int, int, int, int]) -> Image.Image:
    """A grey photo of ``size`` (width, height) with a MARK rectangle ``mark`` (x0, y0, x1, y1)."""
    width, height = size
    pixels = np.full((height, width, 3), GREY, np.uint8)
    x0, y0, x1, y1 = mark
    pixels[y0:y1, x0:x1] = MARK
    return Image.fromarray(pixels)


def _close(pixels: np.ndarray, colour) -> bool:
    return bool(np.abs(pixels.astype(int) - np.asarray(colour)).max() <= 2)


# By hand: a portrait or square target takes new width W and new height int(W * h / w), a landscape one
# new height H and new width int(H * w / h); the photo is pasted at ((W - new w) // 2, (H - new h) // 2).
@pytest.mark.parametrize(
    ("photo_size", "mark", "target", "pasted", "mark_on_canvas"),
    [
        # portrait photo into a portrait target: 240 x 320 (scale 0.8) at (0, 40), white above and below
        ((300, 400), (100, 200, 150, 250), (240, 400), (0, 40, 240, 360), (80, 200, 120, 240)),
        # landscape photo into a portrait target: 240 x 120 (scale 0.6) at (0, 140)
        ((400, 200), (100, 50, 200, 150), (240, 400), (0, 140, 240, 260), (60, 170, 120, 230)),
        # the case: 864 x 1536 (scale 1.2) at (0, -192), 192 rows cropped above and below
        ((720, 1280), (300, 600, 350, 650), (864, 1152), (0, -192, 864, 1344), (360, 528, 420, 588)),
        # portrait photo into a landscape target: 180 x 240 (scale 0.6) at (110, 0), white at the sides
        ((300, 400), (100, 200, 150, 250), (400, 240), (110, 0, 290, 240), (170, 120, 200, 150)),
        # landscape photo into a landscape target: 480 x 240 (scale 1.2) at (-40, 0), sides cropped
        ((400, 200), (100, 50, 200, 150), (400, 240), (-40, 0, 440, 240), (80, 60, 200, 180)),
    ],
)
def test_pose_photo_is_resized_and_padded_as_released(photo_size, mark, target, pasted, mark_on_canvas):
    canvas = resize_and_pad_image(_marked_photo(photo_size, mark), target)
    assert canvas.size == target and canvas.mode == "RGB"
    pixels = np.asarray(canvas)
    left, top, right, bottom = pasted
    covered = np.zeros(pixels.shape[:2], bool)
    covered[max(top, 0) : bottom, max(left, 0) : right] = True
    np.testing.assert_array_equal((pixels == WHITE).all(axis=2), ~covered)
    x0, y0, x1, y1 = mark_on_canvas
    assert _close(pixels[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4], MARK)  # LANCZOS blurs ~3 px at the edges
    middle_x, middle_y = (x0 + x1) // 2, (y0 + y1) // 2
    for x, y in ((x0 - 5, middle_y), (x1 + 4, middle_y), (middle_x, y0 - 5), (middle_x, y1 + 4)):
        assert _close(pixels[y, x], (GREY,) * 3)


def _row_numbered_photo(width: int, height: int) -> Image.Image:
    """Each pixel's value is its row number, so the canvas shows which photo row landed where."""
    rows = np.arange(height, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows, (height, width, 3))))


def test_pose_photo_offsets_floor_and_sizes_truncate_as_released():
    # the photo is as wide as the target: not resampled, only shifted
    overflowing = np.asarray(resize_and_pad_image(_row_numbered_photo(80, 133), (80, 120)))
    assert (overflowing[:, :, 0] == np.arange(7, 127)[:, None]).all()  # offset (120 - 133) // 2 = -7
    padded = np.asarray(resize_and_pad_image(_row_numbered_photo(80, 101), (80, 120)))
    assert (padded[:9] == 255).all() and (padded[110:] == 255).all()  # offset (120 - 101) // 2 = 9
    assert (padded[9:110, :, 0] == np.arange(101)[:, None]).all()
    # the release computes int(176 * (441 / 198)) = int(391.99999999999994) = 391 rows, at (400 - 391) // 2
    rounded = np.asarray(resize_and_pad_image(Image.new("RGB", (198, 441), (GREY,) * 3), (176, 400)))
    assert (rounded[:4] == 255).all() and (rounded[395:] == 255).all()
    assert (rounded[4:395] == GREY).all()
    # a side that truncates to 0 pixels keeps 1 (the release fails there)
    strip = np.asarray(resize_and_pad_image(Image.new("RGB", (1000, 1), (GREY,) * 3), (16, 16)))
    assert (strip[7] == GREY).all() and (np.delete(strip, 7, axis=0) == 255).all()
