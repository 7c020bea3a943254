"""Tiny ONNX models with an insightface pack's signatures (for tests and the benchmark, no weights needed).

insightface's model_zoo routes them exactly like antelopev2's models:

* ``det_tiny.onnx`` is SCRFD-shaped (9 outputs: scores, boxes, keypoints at strides 8/16/32, 2 anchors).
  It "detects" a white square that fills exactly one stride-32 cell on a darker surround: that cell
  scores ~1, everything else ~0. Its box is the cell and its keypoints sit where the ArcFace template
  puts them inside that box. A white square of two cells is too big to detect at a det size that keeps
  it two cells wide, and is found once the det size halves: the retry path.
* ``rec_tiny.onnx`` is ArcFace-shaped: Nx3x112x112 -> Nx512 (mean colour times a fixed matrix).
* ``lmk3d_tiny.onnx`` is 1k3d68-shaped: 1x3x192x192 -> 1x3309; it always returns the generic face turned
  by ``LANDMARK_YAW`` degrees, so head pose can be checked through insightface's Landmark class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infu.face.align import ARCFACE_TEMPLATE
from infu.face.pose import generic_face_3d

CELL = 32
"""The tiny detector's face size at det-size scale: one stride-32 cell."""
LANDMARK_YAW = 25.0
EMBEDDING_DIM = 512
OPSET = 18


def _model(nodes: list, inputs: list, outputs: list, initializers: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _flatten_anchors(nodes: list, source: str, channels: int, output: str) -> None:
    """(1, C, h, w) -> (h * w * 2, C): two identical anchors per location, SCRFD's row order."""
    nodes += [
        helper.make_node("Concat", [source, source], [f"{output}_pair"], axis=1),
        helper.make_node("Transpose", [f"{output}_pair"], [f"{output}_hwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [f"{output}_hwc", f"shape_{channels}"], [output]),
    ]


def tiny_detector() -> onnx.ModelProto:
    """SCRFD signature: input 1x3xHxW; outputs score_{8,16,32}, bbox_{8,16,32}, kps_{8,16,32}."""
    nodes = [helper.make_node("ReduceMean", ["input.1", "axes_c"], ["gray"], keepdims=1)]
    initializers = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes_c"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_1"),
        numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape_4"),
        numpy_helper.from_array(np.array([-1, 10], dtype=np.int64), "shape_10"),
        _const("zero", 0.0),
        _const("gain", 40.0),
        _const("white_level", 0.8),
        _const("surround_level", -0.2),
        # distances in strides from the anchor (the cell's top-left corner): the box is the cell
        _const("box_distances", np.array([0.0, 0.0, 1.0, 1.0]).reshape(1, 4, 1, 1)),
        _const("kps_offsets", (ARCFACE_TEMPLATE / 112.0).reshape(1, 10, 1, 1)),
    ]
    for stride in (8, 16, 32):
        pooled = f"pooled_{stride}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["gray"], [pooled], kernel_shape=[stride] * 2, strides=[stride] * 2
            )
        )
        blank = f"blank_{stride}"
        nodes.append(helper.make_node("Mul", [pooled, "zero"], [blank]))
        if stride == CELL:
            nodes += [
                helper.make_node(
                    "AveragePool",
                    [pooled],
                    ["surround"],
                    kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1],
                    count_include_pad=1,
                ),
                helper.make_node("Sub", [pooled, "white_level"], ["white_margin"]),
                helper.make_node("Mul", ["white_margin", "gain"], ["white_logit"]),
                helper.make_node("Sigmoid", ["white_logit"], ["is_white"]),
                helper.make_node("Sub", ["surround_level", "surround"], ["surround_margin"]),
                helper.make_node("Mul", ["surround_margin", "gain"], ["surround_logit"]),
                helper.make_node("Sigmoid", ["surround_logit"], ["is_isolated"]),
                helper.make_node("Mul", ["is_white", "is_isolated"], ["score_map"]),
            ]
            score_map = "score_map"
        else:
            score_map = blank
        nodes += [
            helper.make_node("Add", [blank, "box_distances"], [f"box_map_{stride}"]),
            helper.make_node("Add", [blank, "kps_offsets"], [f"kps_map_{stride}"]),
        ]
        _flatten_anchors(nodes, score_map, 1, f"score_{stride}")
        _flatten_anchors(nodes, f"box_map_{stride}", 4, f"bbox_{stride}")
        _flatten_anchors(nodes, f"kps_map_{stride}", 10, f"kps_{stride}")
    graph_outputs = [
        helper.make_tensor_value_info(f"{kind}_{stride}", TensorProto.FLOAT, [None, width])
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))
        for stride in (8, 16, 32)
    ]
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    return _model(nodes, [graph_input], graph_outputs, initializers, "tiny_scrfd")


def tiny_recognizer(seed: int = 0) -> onnx.ModelProto:
    """ArcFace signature: Nx3x112x112 -> Nx512, a fixed random projection of the crop's mean colour."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["colour"]),
        helper.make_node("Flatten", ["colour"], ["colour_flat"]),
        helper.make_node("MatMul", ["colour_flat", "projection"], ["projected"]),
        helper.make_node("Add", ["projected", "offset"], ["fc1"]),
    ]
    initializers = [
        _const("projection", rng.normal(size=(3, EMBEDDING_DIM))),
        _const("offset", rng.normal(size=EMBEDDING_DIM)),
    ]
    graph_input = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])
    graph_output = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
    return _model(nodes, [graph_input], [graph_output], initializers, "tiny_arcface")


def turned_face_landmarks(yaw_degrees: float) -> np.ndarray:
    """(68, 3) generic face turned by ``yaw_degrees``, in 1k3d68 output space (x, y in [-1, 1])."""
    angle = np.radians(yaw_degrees)
    # camera axes (y down, z away): nose turning to the image's right is a rotation about y by -angle
    turn = np.array(
        [[np.cos(angle), 0.0, -np.sin(angle)], [0.0, 1.0, 0.0], [np.sin(angle), 0.0, np.cos(angle)]]
    )
    face = generic_face_3d() @ turn.T
    face = face / np.abs(face[:, :2]).max() * 0.6
    return face * np.array([1.0, 1.0, -1.0])


def tiny_landmarker(yaw_degrees: float = LANDMARK_YAW) -> onnx.ModelProto:
    """1k3d68 signature: 1x3x192x192 -> 1x3309 (1103 xyz points; the last 68 are the landmarks)."""
    values = np.zeros((1103, 3), dtype=np.float32)
    values[-68:] = turned_face_landmarks(yaw_degrees)
    nodes = [
        helper.make_node("ReduceMean", ["data", "axes_all"], ["level"], keepdims=0),
        helper.make_node("Mul", ["level", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "landmarks"], ["fc1"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes_all"),
        _const("zero", np.zeros((1, 1))),
        _const("landmarks", values.reshape(1, 3309)),
    ]
    graph_input = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])
    graph_output = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3309])
    return _model(nodes, [graph_input], [graph_output], initializers, "tiny_1k3d68")


def write_tiny_pack(root: Path, pack_name: str = "tinypack", with_landmarks: bool = True) -> Path:
    """Write the tiny models as ``<root>/models/<pack_name>/*.onnx``; returns ``root``."""
    folder = root / "models" / pack_name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_detector(), folder / "det_tiny.onnx")
    onnx.save(tiny_recognizer(), folder / "rec_tiny.onnx")
    if with_landmarks:
        onnx.save(tiny_landmarker(), folder / "lmk3d_tiny.onnx")
    return root


def white_square_image(
    size: int = 640, square: int = CELL, corner: tuple[int, int] = (288, 224)
) -> np.ndarray:
    """A dark-gray RGB image with one white ``square`` whose top-left corner is ``corner`` (x, y)."""
    image = np.full((size, size, 3), 20, dtype=np.uint8)
    x, y = corner
    image[y : y + square, x : x + square] = 255
    return image
