"""FaceBatchAnnotator: the ``ray.data.map_batches`` callable, called directly and inside a local Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from infu.face import FaceBatchAnnotator, FaceConfig, largest_face
from infu.face.ray_batch import (
    FACE_BOXES,
    FACE_COUNT,
    FACE_EMBEDDING,
    FACE_ERROR,
    FACE_KPS,
    FACE_LARGEST,
    FACE_POSE,
    FACE_SCORES,
)
from infu.face.tiny_models import LANDMARK_YAW, white_square_image, write_tiny_pack
from infu.paths import package_file

INSIGHTFACE_IMAGES = package_file("insightface", "data", "images")
CPU = ["CPUExecutionProvider"]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> FaceConfig:
    root = write_tiny_pack(tmp_path_factory.mktemp("insightface_root"), "tinypack")
    return FaceConfig(
        backend="insightface", model_root=root, pack_name="tinypack", providers=CPU, recognizer="glintr100"
    )


def test_dlib_batch_adds_face_columns_and_keeps_the_input():
    annotator = FaceBatchAnnotator(FaceConfig(backend="dlib"))
    images = [
        (INSIGHTFACE_IMAGES / "t1.jpg").read_bytes(),
        b"<html>not an image</html>",
        _png(np.full((120, 160, 3), 128, np.uint8)),
        (INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png").read_bytes(),
    ]
    batch = {"image": np.array(images, dtype=object), "key": np.array(["a", "b", "c", "d"])}
    out = annotator(batch)
    assert list(out["key"]) == ["a", "b", "c", "d"] and out["image"] is batch["image"]
    counts = out[FACE_COUNT]
    assert counts[0] >= 5 and list(counts[1:]) == [0, 0, 1]
    assert list(out[FACE_ERROR]) == ["", "not_image", "", ""]
    assert out[FACE_EMBEDDING].shape == (4, 128) and out[FACE_EMBEDDING].dtype == np.float32
    assert list(out[FACE_LARGEST][1:3]) == [-1, -1] and not out[FACE_EMBEDDING][1:3].any()
    for row, count in enumerate(counts):
        assert out[FACE_BOXES][row].shape == (count, 4)
        assert out[FACE_SCORES][row].shape == (count,)
        assert out[FACE_KPS][row].shape == (count, 5, 2)
        assert out[FACE_POSE][row].shape == (count, 3) and np.isfinite(out[FACE_POSE][row]).all()
    for row in (0, 3):
        expected = largest_face(annotator.analyzer.analyze(images[row]))
        assert np.allclose(out[FACE_BOXES][row][out[FACE_LARGEST][row]], expected.bbox)
        assert np.allclose(out[FACE_EMBEDDING][row], expected.embedding)
        assert np.linalg.norm(out[FACE_EMBEDDING][row]) == pytest.approx(1.0, abs=1e-5)


def test_insightface_batch_columns(tiny_config):
    annotator = FaceBatchAnnotator(tiny_config, image_column="jpeg")
    out = annotator({"jpeg": np.array([_png(white_square_image()), b""], dtype=object)})
    assert list(out[FACE_COUNT]) == [1, 0] and out[FACE_ERROR][1] != ""
    assert out[FACE_EMBEDDING].shape == (2, 512)
    assert out[FACE_POSE][0][0, 0] == pytest.approx(LANDMARK_YAW, abs=3)


def test_declared_resources_per_backend(tiny_config):
    assert FaceBatchAnnotator.resources(FaceConfig(backend="dlib")) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert FaceBatchAnnotator.resources(tiny_config) == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
    }  # CPU provider only


@pytest.mark.slow
def test_runs_in_ray_data_map_batches(tiny_config):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        items = [{"key": i, "image": _png(white_square_image(corner=(32 * i, 64)))} for i in range(5)]
        items.append({"key": 5, "image": b"broken"})
        dataset = ray.data.from_items(items).map_batches(
            FaceBatchAnnotator,
            fn_constructor_kwargs={"config": tiny_config},
            batch_size=2,
            concurrency=1,
            **FaceBatchAnnotator.resources(tiny_config),
        )
        rows = sorted(dataset.take_all(), key=lambda row: row["key"])
    finally:
        if started_here:
            ray.shutdown()
    assert [row[FACE_COUNT] for row in rows] == [1, 1, 1, 1, 1, 0]
    assert rows[5][FACE_ERROR] == "not_image" and rows[5][FACE_BOXES].shape == (0, 4)
    for i, row in enumerate(rows[:5]):
        assert np.allclose(row[FACE_BOXES], [[32 * i, 64, 32 * i + 32, 96]], atol=0.5)
        assert row[FACE_KPS].shape == (1, 5, 2) and row[FACE_EMBEDDING].shape == (512,)
