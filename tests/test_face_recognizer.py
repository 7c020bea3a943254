"""Recognizers and embedding spaces: facexlib's IR-SE50 as the release applies it, glintr100 alone, dlib."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
from facexlib.recognition.arcface_arch import Backbone
from insightface.utils.face_align import norm_crop
from PIL import Image

from infu.config import load_config
from infu.face import FaceConfig, FaceModelsError, cosine_similarity, load_face_analyzer, load_recognizer
from infu.face.base import l2_normalize
from infu.face.dlib_backend import DESCRIPTOR_FILE, PREDICTOR_FILE, dlib_model_dir
from infu.face.tiny_models import white_square_image, write_tiny_pack
from infu.model.config import ModelConfig
from infu.model.factory import build_pipeline
from infu.paths import package_file

from .conftest import PROJECT_ROOT
from .test_model_pipeline import TINY

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # insightface's norm_crop: deprecated skimage API
    pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning"),
]

PACK = "tinypack"
CPU = ["CPUExecutionProvider"]
INSIGHTFACE_IMAGES = package_file("insightface", "data", "images")


def ir_se50() -> Backbone:
    return Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")


@pytest.fixture(scope="module")
def ir_se50_weights(tmp_path_factory) -> Path:
    """A seeded random-init IR-SE50 state dict, saved as facexlib's weights file is."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("facexlib") / "recognition_arcface_ir_se50.pth"
    torch.save(ir_se50().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory) -> Path:
    return write_tiny_pack(tmp_path_factory.mktemp("insightface_root"), PACK)


@pytest.fixture(scope="module")
def glintr100_analyzer(pack_root):
    return load_face_analyzer(
        FaceConfig(
            backend="insightface", model_root=pack_root, pack_name=PACK, providers=CPU, recognizer="glintr100"
        )
    )


def test_arcface_ir_se50_is_facexlibs_backbone_on_the_bgr_norm_crop(shared_faces, ir_se50_weights):
    photo = shared_faces / "bulk__Rob_Lowe_0001.jpg"  # one face (README of ../shared/data)
    config = FaceConfig(backend="dlib", recognizer="arcface_ir_se50", recognizer_weights=ir_se50_weights)
    analyzer = load_face_analyzer(config)  # dlib finds the keypoints, IR-SE50 embeds
    assert (analyzer.embedding_space, analyzer.embedding_dim) == ("arcface_ir_se50", 512)
    face = analyzer.require_largest(photo)

    # the release's recipe, computed here independently: BGR, norm_crop, x / 255 * 2 - 1, NCHW
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    crop = norm_crop(bgr, face.kps, 112)
    crops = np.stack([crop, crop[:, :, ::-1]]).astype(np.float32) / 255 * 2 - 1
    crops = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))  # NCHW
    backbone = ir_se50()
    backbone.load_state_dict(torch.load(ir_se50_weights, map_location="cpu", weights_only=True))
    with torch.no_grad():
        outputs = backbone.eval()(torch.from_numpy(crops)).numpy()
    expected, rgb_order = (l2_normalize(row) for row in outputs)

    np.testing.assert_allclose(face.embedding, expected, atol=1e-5)
    assert np.abs(rgb_order - expected).max() > 1e-3  # the check tells channel orders apart
    alone = load_recognizer(FaceConfig(recognizer="arcface_ir_se50", recognizer_weights=ir_se50_weights))
    np.testing.assert_allclose(alone.embed(rgb, face.kps), expected, atol=1e-5)


def test_arcface_ir_se50_weights_are_required_and_loaded_strictly(ir_se50_weights, tmp_path):
    with pytest.raises(FaceModelsError, match=r"face\.recognizer_weights is not set"):
        load_recognizer(FaceConfig(recognizer="arcface_ir_se50"))
    absent = tmp_path / "absent.pth"
    with pytest.raises(
        FaceModelsError, match=rf"face\.recognizer_weights {re.escape(str(absent))} is not a file"
    ):
        load_recognizer(FaceConfig(recognizer="arcface_ir_se50", recognizer_weights=absent))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(garbage))} \(face\.recognizer_weights\)"):
        load_recognizer(FaceConfig(recognizer="arcface_ir_se50", recognizer_weights=garbage))

    state = torch.load(ir_se50_weights, map_location="cpu", weights_only=True)
    extra, missing = tmp_path / "extra.pth", tmp_path / "missing.pth"
    torch.save({**state, "head.weight": torch.zeros(1)}, extra)
    torch.save({"input_layer.0.weight": state["input_layer.0.weight"]}, missing)
    for path, problem in ((extra, r"Unexpected key.*head\.weight"), (missing, r"Missing key.*body\.0")):
        with pytest.raises(ValueError, match=rf"(?s){re.escape(str(path))} .*not an IR-SE50.*{problem}"):
            load_recognizer(FaceConfig(recognizer="arcface_ir_se50", recognizer_weights=path))


def test_glintr100_alone_equals_the_insightface_analyzers_embedding(glintr100_analyzer, pack_root, tmp_path):
    tinted = white_square_image(corner=(96, 416))
    tinted[416:448, 96:128] = (255, 250, 228)
    images = [tinted, white_square_image(corner=(288, 224))]
    faces = [glintr100_analyzer.require_largest(image) for image in images]
    assert glintr100_analyzer.embedding_space == "glintr100"
    # a pack folder with nothing but the recognizer: no detector is needed to load it
    (tmp_path / "models" / PACK).mkdir(parents=True)
    shutil.copy(pack_root / "models" / PACK / "rec_tiny.onnx", tmp_path / "models" / PACK)
    alone = load_recognizer(
        FaceConfig(recognizer="glintr100", model_root=tmp_path, pack_name=PACK, providers=CPU)
    )
    assert (alone.embedding_space, alone.embedding_dim) == ("glintr100", 512)
    batch = alone.embed_faces([(image, face.kps) for image, face in zip(images, faces, strict=True)])
    for image, face, batched in zip(images, faces, batch, strict=True):
        np.testing.assert_allclose(alone.embed(image, face.kps), face.embedding, atol=1e-6)
        np.testing.assert_allclose(batched, face.embedding, atol=1e-6)
    assert not np.allclose(faces[0].embedding, faces[1].embedding, atol=1e-3)
    detector_only = tmp_path / "detector_only" / "models" / PACK
    detector_only.mkdir(parents=True)
    shutil.copy(pack_root / "models" / PACK / "det_tiny.onnx", detector_only)
    with pytest.raises(FaceModelsError, match="no face recognition model"):
        load_recognizer(
            FaceConfig(
                recognizer="glintr100", model_root=detector_only.parents[1], pack_name=PACK, providers=CPU
            )
        )


def test_dlib_analyzer_embeddings_are_dlibs_descriptors_of_its_own_shapes():
    analyzer = load_face_analyzer(FaceConfig())
    assert (analyzer.embedding_space, analyzer.embedding_dim) == ("dlib", 128)
    group = analyzer.load(INSIGHTFACE_IMAGES / "t1.jpg")
    faces = analyzer.analyze_rgb(group)
    assert len(faces) >= 5
    # dlib called directly on the analyzer's boxes, as the analyzer embedded before recognizers existed
    models = dlib_model_dir()
    predictor = dlib.shape_predictor(str(models / PREDICTOR_FILE))
    encoder = dlib.face_recognition_model_v1(str(models / DESCRIPTOR_FILE))
    boxes = [dlib.rectangle(*(int(value) for value in face.bbox)) for face in faces]
    shapes = dlib.full_object_detections([predictor(group, box) for box in boxes])
    for face, descriptor in zip(faces, encoder.compute_face_descriptor(group, shapes, 1), strict=True):
        np.testing.assert_array_equal(face.embedding, l2_normalize(np.asarray(descriptor)))
    # from keypoints alone, the 68 landmarks are fitted in the box dlib's detector would give
    alone = load_recognizer(FaceConfig(recognizer="dlib"))
    for face in faces:
        assert cosine_similarity(alone.embed(group, face.kps), face.embedding) > 0.98


def test_the_recognizer_defaults_by_backend_and_nonsense_is_rejected():
    assert FaceConfig().recognizer == "dlib"
    assert FaceConfig(backend="insightface").recognizer == "arcface_ir_se50"
    assert FaceConfig(backend="dlib", recognizer="arcface_ir_se50").recognizer == "arcface_ir_se50"
    with pytest.raises(ValueError, match="with backend insightface use arcface_ir_se50"):
        FaceConfig(backend="insightface", recognizer="dlib")


def test_shipped_configs_embed_in_their_projections_space():
    production = load_config(PROJECT_ROOT / "configs" / "flux-dev.yaml")
    assert production.face.recognizer == production.model.projection.embedding_space == "arcface_ir_se50"
    assert production.face.recognizer_weights.name == "recognition_arcface_ir_se50.pth"
    assert production.face.recognizer_weights.is_relative_to(production.model.infu_model)  # as antelopev2
    assert production.face.model_root.is_relative_to(production.model.infu_model)
    embedded = load_config(PROJECT_ROOT / "configs" / "embedded.yaml")
    assert embedded.face.recognizer == embedded.model.projection.embedding_space == "dlib"


def tiny_model(embedding_space: str) -> ModelConfig:
    """The tiny pipeline of test_model_pipeline with a 512-D projection of ``embedding_space``."""
    projection = {**TINY.projection.model_dump(), "embedding_dim": 512, "embedding_space": embedding_space}
    return ModelConfig(**{**TINY.model_dump(), "projection": projection})


def test_a_pipeline_takes_only_a_face_analyzer_of_its_projections_space(glintr100_analyzer):
    with pytest.raises(
        ValueError, match="embeds into glintr100 but the projection was trained on arcface_ir_se50"
    ):
        build_pipeline(tiny_model("arcface_ir_se50"), face_analyzer=glintr100_analyzer)
    pipeline = build_pipeline(tiny_model("glintr100"), face_analyzer=glintr100_analyzer)
    pipeline.set_progress_bar_config(disable=True)
    image = white_square_image()
    embedding = glintr100_analyzer.require_largest(image).embedding

    def generate(**identity) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipeline("a portrait photo", generator=generator, output_type="np", **identity).images

    np.testing.assert_array_equal(generate(id_image=image), generate(id_embedding=embedding))
