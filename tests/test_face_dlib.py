"""The embedded dlib backend on real photos: ../shared/data (skipped when absent) and package images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from infu.face import (
    BadImageError,
    FaceAnalyzer,
    FaceConfig,
    NoFaceError,
    id_loss,
    largest_face,
    load_face_analyzer,
)
from infu.face.dlib_backend import dlib_model_dir
from infu.paths import package_file

INSIGHTFACE_IMAGES = package_file("insightface", "data", "images")


@pytest.fixture(scope="module")
def dlib_analyzer() -> FaceAnalyzer:
    return load_face_analyzer(FaceConfig(backend="dlib"))


def _embedding(analyzer: FaceAnalyzer, path: Path) -> np.ndarray:
    return analyzer.require_largest(path).embedding


def test_models_are_found_without_importing_face_recognition_models():
    folder = dlib_model_dir()
    assert (folder / "shape_predictor_68_face_landmarks.dat").stat().st_size > 1_000_000
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").stat().st_size > 1_000_000


def test_group_photo_shipped_with_insightface(dlib_analyzer):
    faces = dlib_analyzer.analyze(INSIGHTFACE_IMAGES / "t1.jpg")
    assert len(faces) >= 5
    for face in faces:
        assert face.kps.shape == (5, 2) and face.embedding.shape == (128,)
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        x1, y1, x2, y2 = face.bbox
        assert x1 < face.kps[:, 0].min() and face.kps[:, 0].max() < x2
        assert y1 < face.kps[:, 1].min() and face.kps[:, 1].max() < y2
        left_eye, right_eye, nose, left_mouth, right_mouth = face.kps
        assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]  # "left" = image left
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
        assert face.score > 0 and face.pose is not None


def test_embedding_survives_a_flip_and_rescale_but_separates_people(dlib_analyzer):
    group = np.asarray(Image.open(INSIGHTFACE_IMAGES / "t1.jpg").convert("RGB"))
    faces = dlib_analyzer.analyze_rgb(group)
    face = largest_face(faces)
    x1, y1, x2, y2 = face.bbox.astype(int)
    pad = (x2 - x1) // 2
    crop = group[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad]
    changed = cv2.resize(crop[:, ::-1], None, fx=1.7, fy=1.7, interpolation=cv2.INTER_CUBIC)
    same = dlib_analyzer.require_largest(changed).embedding
    assert id_loss(face.embedding, same) < 0.05
    assert min(id_loss(same, other.embedding) for other in faces if other is not face) > 2 * id_loss(
        face.embedding, same
    )


def test_images_without_faces_and_typed_errors(dlib_analyzer, tmp_path):
    for name in ("mask_blue.jpg", "mask_white.jpg"):
        assert dlib_analyzer.analyze(INSIGHTFACE_IMAGES / name) == []
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 150), (90, 90, 90)).save(blank)
    with pytest.raises(NoFaceError, match="blank.png"):
        dlib_analyzer.require_largest(blank)
    with pytest.raises(NoFaceError, match="reference image"):
        dlib_analyzer.require_largest(blank.read_bytes(), name="reference image")
    with pytest.raises(BadImageError) as error:
        dlib_analyzer.analyze(b"GIF89a not really")
    assert error.value.reason in {"not_image", "bad_image"}


def test_grayscale_and_rgba_inputs_are_analyzed(dlib_analyzer):
    tom = Image.open(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png")
    for mode in ("L", "RGBA"):
        assert len(dlib_analyzer.analyze(tom.convert(mode))) == 1


def test_batch_api_matches_single_calls_and_keeps_bad_images_in_place(dlib_analyzer):
    tom = (INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png").read_bytes()
    results = dlib_analyzer.analyze_batch(
        [tom, b"\x89PNG\r\n\x1a\n broken", INSIGHTFACE_IMAGES / "mask_green.jpg"]
    )
    assert isinstance(results[1], BadImageError)
    assert len(results[0]) == 1 and results[2] == []
    assert np.allclose(results[0][0].embedding, dlib_analyzer.analyze(tom)[0].embedding)


def test_big_images_are_detected_at_the_capped_size(dlib_analyzer):
    tom = np.asarray(Image.open(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png").convert("RGB"))
    scene = np.zeros((2000, 2400, 3), dtype=np.uint8)
    scene[900:1460, 1000:1560] = cv2.resize(tom, (560, 560), interpolation=cv2.INTER_CUBIC)
    face = dlib_analyzer.require_largest(scene)
    reference = dlib_analyzer.require_largest(tom)
    expected = reference.bbox * 5 + np.array([1000, 900, 1000, 900])
    overlap = np.clip(
        np.minimum(face.bbox[2:], expected[2:]) - np.maximum(face.bbox[:2], expected[:2]), 0, None
    )
    assert overlap.prod() / ((expected[2:] - expected[:2]).prod()) > 0.7
    assert id_loss(face.embedding, reference.embedding) < 0.05


@pytest.mark.shared_data
class TestSharedPhotos:
    def test_same_person_is_closer_than_other_people(self, dlib_analyzer, shared_faces):
        rob_1 = _embedding(dlib_analyzer, shared_faces / "bulk__Rob_Lowe_0001.jpg")
        rob_2 = _embedding(dlib_analyzer, shared_faces / "bulk__Rob_Lowe_0002.jpg")
        nathalie = _embedding(dlib_analyzer, shared_faces / "bulk__Nathalie_Baye_0002.jpg")
        tom = _embedding(dlib_analyzer, shared_faces / "images__Tom_Hanks_54745.png")
        same = id_loss(rob_1, rob_2)
        for rob in (rob_1, rob_2):
            for other in (nathalie, tom):
                assert same < id_loss(rob, other)
        # descriptor distance (dlib's own metric, 0.6 = its same-person threshold)
        assert np.linalg.norm(rob_1 - rob_2) < 0.6 < np.linalg.norm(rob_1 - nathalie)

    def test_group_photo_no_face_and_corrupt_file(self, dlib_analyzer, shared_faces):
        assert len(dlib_analyzer.analyze(shared_faces / "images__t1.jpg")) >= 5
        assert dlib_analyzer.analyze(shared_faces / "crop__no_face.png") == []
        with pytest.raises(BadImageError) as error:
            dlib_analyzer.analyze(shared_faces / "bulk__pedestrian.png")
        assert "bulk__pedestrian.png" in str(error.value) and error.value.reason == "bad_image"

    def test_exif_orientation_is_applied_before_detection(self, dlib_analyzer, shared_faces):
        path = shared_faces / "bulk__image_T1.jpeg"
        stored = Image.open(path)
        assert stored.getexif().get(0x0112) == 6
        assert dlib_analyzer.analyze_rgb(np.asarray(stored.convert("RGB"))) == []  # as stored: sideways
        faces = dlib_analyzer.analyze(path)
        assert len(faces) == 1
        assert faces[0].kps[2, 1] > faces[0].kps[:2, 1].max()  # upright: nose below the eyes

    def test_turned_heads_have_a_larger_yaw_than_frontal_portraits(
        self, dlib_analyzer, shared_faces, shared_portraits
    ):
        frontal = [
            dlib_analyzer.require_largest(shared_portraits / name).pose for name in ("man.jpg", "woman.jpg")
        ]
        turned = [
            largest_face(dlib_analyzer.analyze(shared_faces / name))
            for name in ("pose__left_face.jpeg", "pose__right_face.png")
        ]
        turned_poses = [face.pose for face in turned if face is not None]
        assert turned_poses, "HOG found neither turned head"
        assert max(abs(pose.yaw) for pose in frontal) < 15
        for pose in turned_poses:
            assert abs(pose.yaw) > max(abs(p.yaw) for p in frontal) + 20
        left = turned[0]
        assert left is not None and left.pose.yaw < -30  # she faces the image's left

    def test_looking_up_and_down_give_the_pitch_sign(self, dlib_analyzer, shared_faces):
        assert dlib_analyzer.require_largest(shared_faces / "pose__rise_face.jpeg").pose.pitch > 10
        assert dlib_analyzer.require_largest(shared_faces / "pose__lower_face.jpeg").pose.pitch < -10
