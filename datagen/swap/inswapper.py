"""insightface's INSwapper (``inswapper_128.onnx``) through onnxruntime, and a tiny random-init ONNX model of
the same interface.

The model's inputs are ``target``, the 128 ArcFace-aligned crop as RGB [1, 3, 128, 128] in [0, 1]
(insightface: mean 0, std 255), and ``source``, the identity latent [1, 512]: the source's L2-normalised
embedding times the ``emap`` matrix (the graph's last initializer), L2-normalised again. Its output is RGB
in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from datagen.swap.base import AlignedCropSwapper, Restorer
from infu.face.providers import CUDA, select_providers

CROP_SIZE = 128
INPUT_NAMES = ("target", "source")
ONNX_OPSET = 17


def onnx_session(model: str | bytes, device: str):
    """An onnxruntime session on the CPU, or CUDA first for a ``cuda*`` device."""
    import onnxruntime

    requested = [CUDA, "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the emap initializer feeds no node: no warning that it is dropped
    return onnxruntime.InferenceSession(model, sess_options=options, providers=select_providers(requested))


def read_emap(model: onnx.ModelProto, source: str) -> np.ndarray:
    """The (embedding dim, latent dim) ``emap``: the graph's last initializer, as insightface reads it."""
    if not model.graph.initializer:
        raise ValueError(f"{source} has no initializers: not an INSwapper model")
    last = model.graph.initializer[-1]
    emap = numpy_helper.to_array(last).astype(np.float32)
    if emap.ndim != 2:
        raise ValueError(f"{source}: the last initializer {last.name!r} is {emap.shape}, not a 2-D emap")
    return emap


class InSwapper(AlignedCropSwapper):
    """INSwapper on the ArcFace-aligned crop (insightface's 128 template: the 112 one centred in 128)."""

    name: ClassVar[str] = "inswapper"

    def __init__(
        self,
        session,
        emap: np.ndarray,
        source: str,
        restore: Restorer | None = None,
        mask_feather: float = 0.1,
    ):
        super().__init__(restore, mask_feather)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 2 or len(outputs) != 1:
            raise ValueError(
                f"{source}: INSwapper has 2 inputs and 1 output, got {len(inputs)} and {len(outputs)}"
            )
        by_name = {node.name: node for node in inputs}
        # insightface feeds them by position; the released model names them target and source.
        target_input, source_input = (
            [by_name[name] for name in INPUT_NAMES] if set(by_name) == set(INPUT_NAMES) else inputs
        )
        crop_height, crop_width = target_input.shape[2:4]
        if not isinstance(crop_height, int) or crop_height != crop_width:
            raise ValueError(
                f"{source}: input {target_input.name!r} {target_input.shape} is not a fixed square"
            )
        if source_input.shape[-1] != emap.shape[1]:
            raise ValueError(
                f"{source}: input {source_input.name!r} takes {source_input.shape[-1]}-D latents but the "
                f"emap maps to {emap.shape[1]}-D"
            )
        self.session, self.emap = session, emap
        self.crop_size = crop_height
        self.target_name, self.source_name = target_input.name, source_input.name
        self.output_name = outputs[0].name

    @classmethod
    def from_onnx(
        cls, path: Path, device: str = "cpu", restore: Restorer | None = None, mask_feather: float = 0.1
    ) -> InSwapper:
        """The model file (``inswapper_128.onnx``, local: never downloaded)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"INSwapper model {path} does not exist")
        emap = read_emap(onnx.load(str(path)), str(path))
        return cls(onnx_session(str(path), device), emap, str(path), restore, mask_feather)

    @classmethod
    def tiny(
        cls,
        embedding_dim: int = 128,
        width: int = 8,
        blocks: int = 2,
        seed: int = 0,
        device: str = "cpu",
        restore: Restorer | None = None,
        mask_feather: float = 0.1,
    ) -> InSwapper:
        """:func:`tiny_inswapper_model` loaded in memory."""
        model = tiny_inswapper_model(embedding_dim, width, blocks, seed)
        session = onnx_session(model.SerializeToString(), device)
        return cls(
            session, read_emap(model, "the tiny INSwapper"), "the tiny INSwapper", restore, mask_feather
        )

    @property
    def embedding_dim(self) -> int:
        return int(self.emap.shape[0])

    def identity_latent(self, embedding: np.ndarray) -> np.ndarray:
        """[1, latent dim] float32: the normalised embedding through ``emap``, L2-normalised."""
        latent = embedding.reshape(1, -1).astype(np.float32) @ self.emap
        return latent / max(float(np.linalg.norm(latent)), 1e-12)

    def swap_crop(self, crop: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        blob = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        feeds = {self.target_name: blob, self.source_name: self.identity_latent(embedding)}
        prediction = self.session.run([self.output_name], feeds)[0][0]
        return np.clip(np.rint(prediction.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


class _GraphBuilder:
    """Nodes and seeded random initializers of an ONNX graph under construction."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def constant(self, stem: str, value: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        output = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def conv(self, x: str, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> str:
        fan_in = in_channels * kernel * kernel
        weight = self.rng.normal(0, np.sqrt(2.0 / fan_in), (out_channels, in_channels, kernel, kernel))
        bias = np.zeros(out_channels)
        pad = kernel // 2
        return self.node(
            "Conv",
            [x, self.constant("w", weight.astype(np.float32)), self.constant("b", bias.astype(np.float32))],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def style(self, x: str, latent: str, latent_dim: int, channels: int) -> str:
        """Instance norm, then ``x * (1 + scale) + shift`` with scale and shift linear in the latent."""
        normalised = self.node(
            "InstanceNormalization",
            [
                x,
                self.constant("ones", np.ones(channels, np.float32)),
                self.constant("zeros", np.zeros(channels, np.float32)),
            ],
            epsilon=1e-5,
        )
        shape = self.constant("shape", np.array([1, channels, 1, 1], np.int64))
        modulations = []
        for stem in ("scale", "shift"):
            weight = self.rng.normal(0, 0.5, (channels, latent_dim)).astype(np.float32)
            linear = self.node(
                "Gemm",
                [latent, self.constant(stem, weight), self.constant(stem, np.zeros(channels, np.float32))],
                transB=1,
            )
            modulations.append(self.node("Reshape", [linear, shape]))
        gain = self.node("Add", [modulations[0], self.constant("one", np.ones(1, np.float32))])
        return self.node("Add", [self.node("Mul", [normalised, gain]), modulations[1]])

    def upsample(self, x: str) -> str:
        scales = self.constant("scales", np.array([1, 1, 2, 2], np.float32))
        return self.node("Resize", [x, "", scales], mode="linear")


def tiny_inswapper_model(
    embedding_dim: int = 128,
    width: int = 8,
    blocks: int = 2,
    seed: int = 0,
    crop_size: int = CROP_SIZE,
    emap: np.ndarray | None = None,
) -> onnx.ModelProto:
    """A random-init INSwapper of the released interface: ``target`` [1, 3, crop, crop] and ``source``
    [1, latent] in, ``output`` [1, 3, crop, crop] in [0, 1] out, ``emap`` (D x latent; random orthogonal
    D x D unless given)
    the last initializer; inside, a conv encoder to 1/4 size, ``blocks`` AdaIN residual blocks conditioned
    on the latent and a bilinear-upsampling decoder."""
    graph = _GraphBuilder(seed)
    if emap is None:
        emap, _ = np.linalg.qr(graph.rng.normal(size=(embedding_dim, embedding_dim)))
    emap = np.asarray(emap, np.float32)
    if emap.shape[0] != embedding_dim:
        raise ValueError(f"emap {emap.shape} does not map {embedding_dim}-D embeddings")
    latent_dim = emap.shape[1]
    x = graph.node("Relu", [graph.conv("target", 3, width, 7)])
    x = graph.node("Relu", [graph.conv(x, width, 2 * width, 3, stride=2)])
    channels = 4 * width
    x = graph.node("Relu", [graph.conv(x, 2 * width, channels, 3, stride=2)])
    for _ in range(blocks):
        update = graph.node(
            "Relu", [graph.style(graph.conv(x, channels, channels, 3), "source", latent_dim, channels)]
        )
        update = graph.style(graph.conv(update, channels, channels, 3), "source", latent_dim, channels)
        x = graph.node("Add", [x, update])
    x = graph.node("Relu", [graph.conv(graph.upsample(x), channels, 2 * width, 3)])
    x = graph.node("Relu", [graph.conv(graph.upsample(x), 2 * width, width, 3)])
    graph.nodes.append(helper.make_node("Sigmoid", [graph.conv(x, width, 3, 7)], ["output"]))
    graph.initializers.append(numpy_helper.from_array(emap, "emap"))
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "tiny_inswapper",
            [
                helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, crop_size, crop_size]),
                helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, latent_dim]),
            ],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, crop_size, crop_size])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    onnx.checker.check_model(model)
    return model
