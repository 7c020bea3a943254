"""Face swap (datagen.swap): the classical swap on real photos, the tiny SimSwap and INSwapper, the shared
paste-back, the restoration hook and the config.

The photos are the six people of insightface's group photo (``infu.sample_corpus.portraits``), always
installed; identities are compared with the embedded dlib recognizer.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from datagen.swap import SwapConfig, build_swapper, feathered_mask, paste_back, resolve_restore
from datagen.swap.classical import face_mask
from datagen.swap.inswapper import InSwapper, tiny_inswapper_model
from datagen.swap.simswap import SimSwapGenerator, SimSwapSwapper
from infu.face import Face, FaceConfig, cosine_similarity, largest_face, load_face_analyzer
from infu.face.align import alignment_matrix
from infu.face.base import l2_normalize
from infu.sample_corpus import portraits

from .conftest import PROJECT_ROOT

RESTORE_CALLS: list[tuple[int, ...]] = []
BRIGHTEN = 60


def brighten(crop: np.ndarray) -> np.ndarray:
    """A stand-in restorer (``tests.test_swap:brighten``): records the crop shape, lifts every pixel."""
    RESTORE_CALLS.append(crop.shape)
    return np.clip(crop.astype(np.int16) + BRIGHTEN, 0, 255).astype(np.uint8)


def drop_a_row(crop: np.ndarray) -> np.ndarray:
    return crop[1:]


CLASSICAL_PAIRS = [(3, 5), (1, 2), (0, 4)]
"""(source, target) portrait indices. Over all 30 ordered pairs of the six people the classical swap raised
the dlib similarity to the source by 0.038 to 0.166 (mean 0.098); these three by 0.142, 0.166 and 0.107."""
IDENTITY_GAIN = 0.05
"""Half the smallest gain of :data:`CLASSICAL_PAIRS`. Different people here are 0.81-0.91 apart in dlib
cosine, so 0.05 is a real move; a swap whose blend silently kept the target (measured while a bug kept
``seamlessClone``'s mask from taking effect) moved it by -0.006 to +0.010."""


@pytest.fixture(scope="module")
def analyzer():
    return load_face_analyzer(FaceConfig(backend="dlib"))


@pytest.fixture(scope="module")
def people(analyzer) -> list[tuple[np.ndarray, Face]]:
    photos = [np.asarray(photo) for photo in portraits()]
    return [
        (photo, analyzer.require_largest(photo, name=f"portrait {index}"))
        for index, photo in enumerate(photos)
    ]


def crop_footprint(shape: tuple[int, ...], kps: np.ndarray, crop_size: int) -> np.ndarray:
    """HxW bool: where the aligned ``crop_size`` crop of the face lies in the image, 2 px dilated."""
    to_image = cv2.invertAffineTransform(alignment_matrix(kps, crop_size))
    corners = np.array([[0, 0], [crop_size, 0], [crop_size, crop_size], [0, crop_size]], np.float64)
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, np.round(corners @ to_image[:, :2].T + to_image[:, 2]).astype(np.int32), 255)
    return cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0


def inner_box(face: Face) -> tuple[slice, slice]:
    """The middle half of the face box (well inside every crop's fully swapped core)."""
    x1, y1, x2, y2 = face.bbox
    dx, dy = (x2 - x1) / 4, (y2 - y1) / 4
    return slice(int(y1 + dy), int(y2 - dy)), slice(int(x1 + dx), int(x2 - dx))


def with_embedding(face: Face, embedding: np.ndarray) -> Face:
    return dataclasses.replace(face, embedding=np.asarray(embedding, np.float32))


# --- classical ------------------------------------------------------------------------------------


def test_classical_swap_moves_identity_towards_the_source(analyzer, people):
    swapper = build_swapper(SwapConfig())
    assert swapper.name == "classical"
    for source_index, target_index in CLASSICAL_PAIRS:
        (source, source_face), (target, target_face) = people[source_index], people[target_index]
        out = swapper.swap(target, target_face, source, source_face)
        assert out.shape == target.shape and out.dtype == np.uint8
        swapped_face = largest_face(analyzer.analyze_rgb(out))
        assert swapped_face is not None
        before = cosine_similarity(target_face.embedding, source_face.embedding)
        after = cosine_similarity(swapped_face.embedding, source_face.embedding)
        to_target = cosine_similarity(swapped_face.embedding, target_face.embedding)
        print(
            f"{source_index}->{target_index}: similarity to the source {before:.3f} -> {after:.3f}, "
            f"to the target {to_target:.3f}"
        )
        assert after > before + IDENTITY_GAIN
        assert after > to_target  # now closer to the source than to the person it was

        mask = face_mask(target.shape, target_face.kps)
        radius = int(np.ceil(0.05 * np.sqrt(np.count_nonzero(mask))))
        around = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
        assert np.array_equal(out[around == 0], target[around == 0])  # outside the face: bit-identical
        changed = np.abs(out.astype(np.int16) - target).max(axis=2) > 0
        assert changed[mask > 0].mean() > 0.9


def test_classical_swap_at_the_image_border(people):
    (source, source_face), (target, target_face) = people[3], people[5]
    cut_x = int(target_face.kps[2, 0])  # through the nose: the left half of the face is off the image
    cut = np.ascontiguousarray(target[:, cut_x:])
    shift = np.array([cut_x, 0], np.float32)
    cut_face = dataclasses.replace(
        target_face, kps=target_face.kps - shift, bbox=target_face.bbox - np.tile(shift, 2)
    )
    swapper = build_swapper(SwapConfig())
    out = swapper.swap(cut, cut_face, source, source_face)
    assert out.shape == cut.shape and out.dtype == np.uint8
    for edge in (np.s_[:, :2], np.s_[:, -2:], np.s_[:2], np.s_[-2:]):  # seamlessClone's mask stays off them
        assert np.array_equal(out[edge], cut[edge])
    mask = face_mask(cut.shape, cut_face.kps)
    changed = np.abs(out.astype(np.int16) - cut).max(axis=2) > 0
    print(f"border swap changed {changed[mask > 0].mean():.3f} of the visible face mask")
    assert changed[mask > 0].mean() > 0.9

    gone = dataclasses.replace(target_face, kps=target_face.kps + 5000)
    assert np.array_equal(swapper.swap(target, gone, source, source_face), target)


# --- the shared paste-back ------------------------------------------------------------------------


def test_paste_back_feathers_inside_the_crop_only(people):
    mask = feathered_mask(224, 0.1)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0 and mask[112, 112] == pytest.approx(1.0)
    assert 0 < mask[112, 25] < 1  # the blurred edge
    target, face = people[2]
    crop = np.full((224, 224, 3), 200, np.uint8)
    out = paste_back(target, crop, alignment_matrix(face.kps, 224), 0.1)
    footprint = crop_footprint(target.shape, face.kps, 224)
    assert np.array_equal(out[~footprint], target[~footprint])
    rows, cols = inner_box(face)
    assert np.all(out[rows, cols] == 200)


# --- SimSwap --------------------------------------------------------------------------------------


def test_simswap_tiny_swaps_inside_the_crop_only(people):
    (source, source_face), (other, other_face), (target, target_face) = people[0], people[1], people[2]
    swapper = build_swapper(SwapConfig(backend="simswap"))
    assert isinstance(swapper, SimSwapSwapper) and swapper.crop_size == 224 and swapper.embedding_dim == 128
    out = swapper.swap(target, target_face, source, source_face)
    assert out.shape == target.shape and out.dtype == np.uint8
    footprint = crop_footprint(target.shape, target_face.kps, 224)
    assert np.array_equal(out[~footprint], target[~footprint])
    rows, cols = inner_box(target_face)
    assert np.abs(out[rows, cols].astype(np.int16) - target[rows, cols]).mean() > 10
    other_identity = swapper.swap(target, target_face, other, other_face)
    identity_effect = np.abs(out[rows, cols].astype(np.int16) - other_identity[rows, cols]).mean()
    print(f"simswap tiny: mean |difference| between two source identities {identity_effect:.1f}")
    assert identity_effect > 5


def release_generator_shapes() -> dict[str, tuple[int, ...]]:
    """The state dict of SimSwap's released 224 generator (``latest_net_G.pth``), as its fs_networks.py lays
    it out: Sequential indices count the parameter-free pads, activations, upsampling and instance norms."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
        shapes[f"{prefix}.bias"] = (out_channels,)

    def batch_norm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    conv("first_layer.1", 64, 3, 7)
    batch_norm("first_layer.2", 64)
    for index, (in_channels, out_channels) in enumerate([(64, 128), (128, 256), (256, 512)], start=1):
        conv(f"down{index}.0", out_channels, in_channels, 3)
        batch_norm(f"down{index}.1", out_channels)
    for block in range(9):
        for half in (1, 2):
            conv(f"BottleNeck.{block}.conv{half}.1", 512, 512, 3)
            shapes[f"BottleNeck.{block}.style{half}.linear.weight"] = (1024, 512)
            shapes[f"BottleNeck.{block}.style{half}.linear.bias"] = (1024,)
    for name, in_channels, out_channels in [("up3", 512, 256), ("up2", 256, 128), ("up1", 128, 64)]:
        conv(f"{name}.1", out_channels, in_channels, 3)
        batch_norm(f"{name}.2", out_channels)
    conv("last_layer.1", 3, 64, 7)
    return shapes


def test_simswap_full_generator_has_the_release_state_dict():
    with torch.device("meta"):
        generator = SimSwapGenerator()
    state = {key: tuple(value.shape) for key, value in generator.state_dict().items()}
    assert len(state) == 123
    assert state == release_generator_shapes()


def test_simswap_save_and_load_round_trip(tmp_path, people):
    (source, source_face), (target, target_face) = people[0], people[2]
    generator = SimSwapGenerator.tiny(embedding_dim=128, width=8, blocks=2, seed=3)
    expected = SimSwapSwapper(generator).swap(target, target_face, source, source_face)
    for name in ("latest_net_G.pth", "generator.safetensors"):
        path = generator.save_pretrained(tmp_path / name)
        loaded = SimSwapGenerator.from_pretrained(path)
        assert (loaded.embedding_dim, loaded.width, loaded.blocks) == (128, 8, 2)
        assert np.array_equal(SimSwapSwapper(loaded).swap(target, target_face, source, source_face), expected)
    through_config = build_swapper(
        SwapConfig(backend="simswap", variant="full", weights=tmp_path / "latest_net_G.pth")
    )
    assert np.array_equal(through_config.swap(target, target_face, source, source_face), expected)


def test_simswap_loading_is_strict(tmp_path):
    path = SimSwapGenerator.tiny().save_pretrained(tmp_path / "good.pth")
    state = torch.load(path, weights_only=True)

    renamed = dict(state)
    renamed["BottleNeck.1.style2.fc.weight"] = renamed.pop("BottleNeck.1.style2.linear.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(
        ValueError, match=r"(?s)renamed.pth does not fit SimSwapGenerator.*BottleNeck.1.style2"
    ):
        SimSwapGenerator.from_pretrained(tmp_path / "renamed.pth")

    missing = {key: value for key, value in state.items() if key != "up2.2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit SimSwapGenerator.*up2\.2\.running_var"):
        SimSwapGenerator.from_pretrained(tmp_path / "missing.pth")

    headless = {key: value for key, value in state.items() if not key.startswith("first_layer")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match=r"does not fit SimSwapGenerator: it has no first_layer.1.weight"):
        SimSwapGenerator.from_pretrained(tmp_path / "headless.pth")

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        SimSwapGenerator.from_pretrained(tmp_path / "absent.pth")


def test_wrong_embedding_dim_is_a_value_error(people):
    (source, source_face), (target, target_face) = people[0], people[2]  # dlib: 128-D
    for swapper in (
        SimSwapSwapper(SimSwapGenerator.tiny(embedding_dim=512)),
        InSwapper.tiny(embedding_dim=512),
    ):
        with pytest.raises(ValueError, match=f"{swapper.name} expects a 512-D identity embedding, got 128-D"):
            swapper.swap(target, target_face, source, source_face)


# --- INSwapper ------------------------------------------------------------------------------------


def test_inswapper_tiny_onnx_runs_through_onnxruntime(tmp_path, people):
    (source, source_face), (other, other_face), (target, target_face) = people[0], people[1], people[2]
    path = tmp_path / "inswapper_128.onnx"
    onnx.save(tiny_inswapper_model(embedding_dim=128, seed=1), path)
    graph = onnx.load(path).graph
    assert graph.initializer[-1].name == "emap" and [node.name for node in graph.input] == [
        "target",
        "source",
    ]
    swapper = build_swapper(SwapConfig(backend="inswapper", variant="full", weights=path))
    assert isinstance(swapper, InSwapper) and swapper.crop_size == 128 and swapper.emap.shape == (128, 128)
    out = swapper.swap(target, target_face, source, source_face)
    assert out.shape == target.shape and out.dtype == np.uint8
    footprint = crop_footprint(target.shape, target_face.kps, 128)
    assert np.array_equal(out[~footprint], target[~footprint])
    rows, cols = inner_box(target_face)
    assert np.abs(out[rows, cols].astype(np.int16) - target[rows, cols]).mean() > 10
    other_identity = swapper.swap(target, target_face, other, other_face)
    identity_effect = np.abs(out[rows, cols].astype(np.int16) - other_identity[rows, cols]).mean()
    print(f"inswapper tiny: mean |difference| between two source identities {identity_effect:.1f}")
    assert identity_effect > 5


def test_inswapper_latent_is_the_embedding_through_emap(tmp_path, people):
    (source, source_face), (target, target_face) = people[0], people[2]
    emap, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(128, 128)))
    swappers = {}
    for name, matrix in (("mapped", emap), ("identity", np.eye(128))):
        path = tmp_path / f"{name}.onnx"
        onnx.save(
            tiny_inswapper_model(embedding_dim=128, seed=1, emap=matrix), path
        )  # same weights otherwise
        swappers[name] = InSwapper.from_onnx(path)
    mapped = swappers["mapped"].swap(target, target_face, source, source_face)
    latent = l2_normalize(source_face.embedding @ emap.astype(np.float32))
    by_hand = swappers["identity"].swap(target, target_face, source, with_embedding(source_face, latent))
    unmapped = swappers["identity"].swap(target, target_face, source, source_face)
    rows, cols = inner_box(target_face)
    same = np.abs(mapped.astype(np.int16) - by_hand)
    differ = np.abs(mapped[rows, cols].astype(np.int16) - unmapped[rows, cols]).mean()
    print(f"emap E vs identity emap fed embedding@E: max |diff| {same.max()}; vs raw embedding: {differ:.1f}")
    assert same.max() <= 1 and same.mean() < 0.01
    assert differ > 5


def test_inswapper_rejects_a_model_without_emap(tmp_path):
    model = tiny_inswapper_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "not_emap"))
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match=r"last initializer 'not_emap' is \(3,\), not a 2-D emap"):
        InSwapper.from_onnx(path)


# --- restoration hook -----------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "crop_size"), [("simswap", 224), ("inswapper", 128), ("classical", 512)])
def test_restore_hook_runs_on_the_swapped_crop(people, backend, crop_size):
    (source, source_face), (target, target_face) = people[0], people[2]
    plain = build_swapper(SwapConfig(backend=backend)).swap(target, target_face, source, source_face)
    RESTORE_CALLS.clear()
    swapper = build_swapper(SwapConfig(backend=backend, restore="tests.test_swap:brighten"))
    restored = swapper.swap(target, target_face, source, source_face)
    assert RESTORE_CALLS == [(crop_size, crop_size, 3)]
    rows, cols = inner_box(target_face)
    lift = (restored[rows, cols].astype(np.float64) - plain[rows, cols]).mean()
    print(f"{backend}: restore hook lifted the face by {lift:.1f}")
    assert lift > BRIGHTEN / 2


def test_bad_restore_hooks_fail_clearly(people):
    with pytest.raises(ValueError, match="cannot import module 'no_such_restorer_module'"):
        resolve_restore("no_such_restorer_module:restore")
    with pytest.raises(ValueError, match="has no attribute 'missing_function'"):
        build_swapper(SwapConfig(restore="tests.test_swap:missing_function"))
    with pytest.raises(ValueError, match="is not callable"):
        resolve_restore("tests.test_swap:BRIGHTEN")
    with pytest.raises(ValidationError, match="restore"):
        SwapConfig(restore="brighten")
    (source, source_face), (target, target_face) = people[0], people[2]
    swapper = build_swapper(SwapConfig(backend="simswap", restore="tests.test_swap:drop_a_row"))
    with pytest.raises(ValueError, match=r"restoration hook returned uint8 \(223, 224, 3\)"):
        swapper.swap(target, target_face, source, source_face)


# --- config and imports ---------------------------------------------------------------------------


def test_swap_config_validation(tmp_path):
    config = SwapConfig()
    assert (config.backend, config.variant, config.embedding_dim, config.weights) == (
        "classical",
        "tiny",
        128,
        None,
    )
    with pytest.raises(ValidationError, match="swap.variant full needs swap.weights.*latest_net_G.pth"):
        SwapConfig(backend="simswap", variant="full")
    with pytest.raises(ValidationError, match="swap.variant full needs swap.weights.*inswapper_128.onnx"):
        SwapConfig(backend="inswapper", variant="full")
    with pytest.raises(ValidationError, match="swap.weights is for variant full"):
        SwapConfig(backend="simswap", weights=tmp_path / "g.pth")
    with pytest.raises(ValidationError, match="classical has no weights"):
        SwapConfig(variant="full", weights=tmp_path / "g.pth")
    with pytest.raises(ValidationError, match="extra"):
        SwapConfig(backend="simswap", width=8)
    with pytest.raises(ValidationError, match="mask_feather"):
        SwapConfig(mask_feather=0.5)
    full = SwapConfig(backend="inswapper", variant="full", weights="models/../inswapper_128.onnx")
    assert full.weights is not None and full.weights.is_absolute() and ".." not in full.weights.parts


def test_each_backend_imports_only_its_own_libraries():
    script = (
        "import sys\n"
        "from datagen.swap import SwapConfig, build_swapper\n"
        "build_swapper(SwapConfig())\n"
        "print(sorted(name for name in ('torch', 'onnxruntime') if name in sys.modules))\n"
        "build_swapper(SwapConfig(backend='inswapper'))\n"
        "print(sorted(name for name in ('torch', 'onnxruntime') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split("\n")[:2] == ["[]", "['onnxruntime']"]
