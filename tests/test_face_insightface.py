"""The insightface backend's real loading path, fed tiny ONNX models with an insightface pack's signatures."""

from __future__ import annotations

import shutil
from pathlib import Path

import insightface.app.face_analysis
import insightface.model_zoo.model_zoo
import numpy as np
import pytest
from insightface.app import FaceAnalysis
from insightface.app.common import Face as InsightFace
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD
from PIL import Image

from infu.face import ARCFACE_TEMPLATE, BadImageError, FaceConfig, NoFaceError, load_face_analyzer
from infu.face.insightface_backend import FaceModelsError, InsightFaceAnalyzer
from infu.face.tiny_models import CELL, EMBEDDING_DIM, LANDMARK_YAW, white_square_image, write_tiny_pack

PACK = "tinypack"
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory) -> Path:
    return write_tiny_pack(tmp_path_factory.mktemp("insightface_root"), PACK)


def _config(root: Path, **overrides) -> FaceConfig:
    """The tiny pack with its own recognizer (glintr100's place in antelopev2)."""
    return FaceConfig(
        backend="insightface",
        model_root=root,
        pack_name=PACK,
        providers=CPU,
        recognizer="glintr100",
        **overrides,
    )


@pytest.fixture(scope="module")
def analyzer(pack_root) -> InsightFaceAnalyzer:
    return load_face_analyzer(_config(pack_root))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface calls a deprecated skimage API
def test_the_tiny_pack_is_a_pack_insightface_itself_loads(pack_root):
    app = FaceAnalysis(name=str(pack_root / "models" / PACK), providers=CPU)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    assert {"detection", "recognition", "landmark_3d_68"} <= set(app.models)
    faces = app.get(np.ascontiguousarray(white_square_image()[:, :, ::-1]))
    assert len(faces) == 1 and faces[0].embedding.shape == (EMBEDDING_DIM,)


def test_models_are_routed_by_their_signatures_through_face_analysis(analyzer, pack_root):
    assert isinstance(analyzer.models["detection"], SCRFD)
    assert isinstance(analyzer.models["recognition"], ArcFaceONNX)
    assert isinstance(analyzer.models["landmark_3d_68"], Landmark)
    assert analyzer.folder == pack_root / "models" / PACK
    assert (analyzer.embedding_dim, analyzer.embedding_space) == (EMBEDDING_DIM, "glintr100")
    assert analyzer.providers == CPU


def test_a_face_comes_back_with_box_keypoints_pose_and_embedding(analyzer):
    faces = analyzer.analyze(white_square_image(corner=(288, 224)))
    assert len(faces) == 1
    face = faces[0]
    assert np.allclose(face.bbox, [288, 224, 288 + CELL, 224 + CELL], atol=0.5)
    assert face.score > 0.99
    assert face.kps.shape == (5, 2)
    assert np.allclose(face.kps, ARCFACE_TEMPLATE / 112 * CELL + [288, 224], atol=0.5)
    assert face.embedding.shape == (EMBEDDING_DIM,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert face.pose.yaw == pytest.approx(LANDMARK_YAW, abs=3)
    assert abs(face.pose.pitch) < 10 and abs(face.pose.roll) < 10


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_embedding_is_insightface_arcface_of_the_aligned_crop(analyzer):
    image = white_square_image(corner=(96, 416))
    image[416 : 416 + CELL, 96 : 96 + CELL] = (255, 250, 228)
    face = analyzer.require_largest(image)
    reference = InsightFace(kps=face.kps, bbox=face.bbox)
    expected = analyzer.models["recognition"].get(np.ascontiguousarray(image[:, :, ::-1]), reference)
    assert np.allclose(face.embedding, expected / np.linalg.norm(expected), atol=1e-5)
    other = analyzer.require_largest(white_square_image(corner=(96, 416)))
    assert not np.allclose(face.embedding, other.embedding, atol=1e-3)


def test_detection_retries_at_smaller_sizes(pack_root, analyzer):
    big_face = white_square_image(square=2 * CELL, corner=(256, 192))
    only_640 = load_face_analyzer(_config(pack_root, det_sizes=[640]))
    assert only_640.analyze(big_face) == []
    faces = analyzer.analyze(big_face)  # 640 finds nothing, 320 finds it
    assert len(faces) == 1
    assert np.allclose(faces[0].bbox, [256, 192, 256 + 2 * CELL, 192 + 2 * CELL], atol=1)


def test_no_face_and_bad_images(analyzer):
    assert analyzer.analyze(np.full((300, 500, 3), 20, np.uint8)) == []
    with pytest.raises(NoFaceError, match="empty frame"):
        analyzer.require_largest(np.full((300, 500, 3), 20, np.uint8), name="empty frame")
    with pytest.raises(BadImageError):
        analyzer.analyze(b"definitely not an image")


def test_batch_api_embeds_all_faces_together_and_matches_single_calls(analyzer):
    images = [
        white_square_image(corner=(64, 64)),
        b"\xff\xd8\xff truncated jpeg",
        np.full((200, 200, 3), 20, np.uint8),
        white_square_image(size=800, square=40, corner=(520, 80)),  # 0.8x at det size 640
    ]
    results = analyzer.analyze_batch(images)
    assert isinstance(results[1], BadImageError) and results[2] == []
    for image, result in zip(images[::3], results[::3], strict=True):
        (single,) = analyzer.analyze(image)
        (batched,) = result
        assert np.allclose(single.bbox, batched.bbox) and np.allclose(single.embedding, batched.embedding)


def test_pack_without_a_landmark_model_has_no_pose(tmp_path):
    root = write_tiny_pack(tmp_path, PACK, with_landmarks=False)
    face = load_face_analyzer(_config(root)).require_largest(white_square_image())
    assert face.pose is None and face.embedding.shape == (EMBEDDING_DIM,)


def test_pack_folder_directly_under_the_root_is_accepted(pack_root, tmp_path):
    shutil.copytree(pack_root / "models" / PACK, tmp_path / PACK)
    assert load_face_analyzer(_config(tmp_path)).folder == tmp_path / PACK


def test_missing_models_fail_clearly_and_nothing_is_downloaded(tmp_path, pack_root, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a model download was attempted")

    monkeypatch.setattr(insightface.app.face_analysis, "ensure_available", no_download)
    monkeypatch.setattr(insightface.model_zoo.model_zoo, "download_onnx", no_download)
    with pytest.raises(FaceModelsError, match="model_root is not set"):
        load_face_analyzer(FaceConfig(backend="insightface", providers=CPU))
    with pytest.raises(FaceModelsError) as error:
        load_face_analyzer(_config(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "models" / PACK) in str(error.value)
    only_recognizer = tmp_path / "models" / PACK
    only_recognizer.mkdir(parents=True)
    shutil.copy(pack_root / "models" / PACK / "rec_tiny.onnx", only_recognizer)
    with pytest.raises(FaceModelsError, match="no face detection model"):
        load_face_analyzer(_config(tmp_path))
    (only_recognizer / "rec_tiny.onnx").unlink()
    shutil.copy(pack_root / "models" / PACK / "det_tiny.onnx", only_recognizer)
    with pytest.raises(FaceModelsError, match="no face recognition model"):
        load_face_analyzer(_config(tmp_path))
    assert load_face_analyzer(_config(pack_root)).embedding_dim == EMBEDDING_DIM


def test_onnx_threads_reach_every_session(pack_root):
    analyzer = load_face_analyzer(_config(pack_root, onnx_threads=1))
    for model in analyzer.models.values():
        assert model.session.get_session_options().intra_op_num_threads == 1


def test_image_files_are_read_with_exif_orientation(analyzer, tmp_path):
    upright = white_square_image(size=320, corner=(32, 224))
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(np.rot90(upright, k=1)).save(path, exif=exif, quality=100)
    (face,) = analyzer.analyze(path)
    assert np.allclose(face.bbox, [32, 224, 32 + CELL, 224 + CELL], atol=2)
