"""Model-free parts of the face stack: alignment, similarity, head pose maths, control image, padding."""

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
    resize_and_pad,
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


def test_resize_and_pad_fits_centres_and_maps_keypoints():
    source = Image.new("RGB", (400, 200), (200, 100, 50))
    padded = resize_and_pad(source, (100, 100), np.array([[0, 0], [400, 200], [200, 100]]))
    pixels = np.asarray(padded.image)
    assert padded.image.size == (100, 100)
    assert padded.scale == (0.25, 0.25) and padded.offset == (0, 25)
    assert not pixels[:25].any() and not pixels[75:].any()
    assert np.abs(pixels[25:75].astype(int) - (200, 100, 50)).max() <= 1
    assert np.allclose(padded.kps, [[0, 25], [100, 75], [50, 50]])
    tall = resize_and_pad(Image.new("RGB", (50, 100), (255, 255, 255)), (300, 100))
    assert tall.offset == (125, 0) and tall.kps is None
    assert np.asarray(tall.image)[:, 125:175].min() >= 254 and not np.asarray(tall.image)[:, :125].any()
