"""Build a pipeline from a :class:`ModelConfig` (tiny random models or real weights): an
:class:`InfUFluxPipeline`, or for ``family: infinite_id`` an :class:`InfiniteIdPipeline`."""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.utils.torch_utils import get_device

from infu.face import FaceAnalyzer
from infu.face.recognizer import EMBEDDING_DIMS
from infu.model.config import ModelConfig
from infu.model.infinite_id import InfiniteIdAdapter, InfiniteIdPipeline
from infu.model.infu import InfU
from infu.model.infusenet import infusenet_block_counts
from infu.model.pipeline import InfUFluxPipeline
from infu.model.tiny import tiny_flux_components

logger = logging.getLogger(__name__)

FLUX_COMPONENTS = (
    "scheduler",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "transformer",
)


def default_dtype(config: ModelConfig) -> torch.dtype:
    """bfloat16 for real weights, float32 for the tiny models (CPU)."""
    return torch.bfloat16 if config.variant == "full" else torch.float32


def require_infu_family(config: ModelConfig) -> None:
    """The FLUX builders serve ``family: infu`` only; Infinite-ID has :func:`build_infinite_id_pipeline`."""
    if config.family != "infu":
        raise ValueError(
            f"model.family {config.family}: this builds InfU on FLUX; use build_infinite_id_pipeline"
        )


def load_infu(config: ModelConfig, transformer: FluxTransformer2DModel, dtype: torch.dtype) -> InfU:
    """The InfU checkpoint of ``config.infu_model``, or a fresh one seeded by ``config.tiny_seed``."""
    if config.infu_model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.tiny_seed)
            return InfU.from_transformer(transformer, config.projection, config.infusenet_factor)
    infu = InfU.from_pretrained(config.infu_model, config.infu_version, config.projection, torch_dtype=dtype)
    expected = infusenet_block_counts(
        transformer.config.num_layers, transformer.config.num_single_layers, config.infusenet_factor
    )
    found = (infu.infusenet.config.num_layers, infu.infusenet.config.num_single_layers)
    if found != expected:
        raise ValueError(
            f"the InfuseNet in {config.infu_model} has {found[0]} double + {found[1]} single blocks, but "
            f"infusenet_factor {config.infusenet_factor} means {expected[0]} + {expected[1]}"
        )
    return infu


def quantize_weights(pipeline: InfUFluxPipeline, weights: str) -> None:
    """8-bit weights (optimum-quanto, frozen) for the transformer and the InfuseNet, in place."""
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    qtype = {"float8": qfloat8, "int8": qint8}[weights]
    for model in (pipeline.transformer, pipeline.infusenet):
        quantize(model, weights=qtype)
        freeze(model)
    logger.info("transformer and InfuseNet weights quantized to %s", weights)


def build_encoders(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> FluxPipeline:
    """The base's frozen VAE and text encoders (with tokenizers and scheduler) as a ``FluxPipeline``
    without its transformer: what a sample's image and caption encode with, the same weights
    :func:`build_pipeline` loads."""
    require_infu_family(config)
    dtype = dtype or default_dtype(config)
    if config.variant == "tiny":
        components = tiny_flux_components(config.projection.output_dim, config.tiny_seed)
        pipeline = FluxPipeline(**{**components, "transformer": None})
        return pipeline.to(device=device, dtype=dtype) if dtype != torch.float32 else pipeline.to(device)
    return FluxPipeline.from_pretrained(config.base_model, transformer=None, torch_dtype=dtype).to(device)


def build_pipeline(
    config: ModelConfig,
    face_analyzer: FaceAnalyzer | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> InfUFluxPipeline:
    """Tiny: random models from ``tiny_seed``. Full: FLUX from ``base_model``. Both: InfU, LoRAs,
    quantization, offload.

    ``dtype`` defaults to bfloat16 for the full variant and float32 for the tiny one. ``cpu_offload``
    needs an accelerator; without one it is skipped (logged) and the pipeline stays on ``device``.
    """
    require_infu_family(config)
    dtype = dtype or default_dtype(config)
    if config.variant == "tiny":
        components = tiny_flux_components(config.projection.output_dim, config.tiny_seed)
    else:
        base = FluxPipeline.from_pretrained(config.base_model, torch_dtype=dtype)
        components = {name: getattr(base, name) for name in FLUX_COMPONENTS}
    infu = load_infu(config, components["transformer"], dtype)
    pipeline = InfUFluxPipeline(
        **components,
        infusenet=infu.infusenet,
        image_proj=infu.projection,
        face_analyzer=face_analyzer,
        inference=config.inference,
    )
    if config.variant == "tiny" and dtype != torch.float32:
        pipeline.to(dtype=dtype)
    pipeline.apply_loras(config.loras, root=config.infu_model, fuse=config.fuse_loras)
    if config.quantize:
        quantize_weights(pipeline, config.quantize)
    if config.cpu_offload and get_device() != "cpu":
        on_accelerator = torch.device(device).type != "cpu"
        pipeline.enable_model_cpu_offload(device=device if on_accelerator else None)
        return pipeline
    if config.cpu_offload:
        logger.info("cpu_offload needs an accelerator and none was found: the models stay on %s", device)
    return pipeline.to(device)


def build_infinite_id_pipeline(
    config: ModelConfig,
    face_analyzer: FaceAnalyzer | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> InfiniteIdPipeline:
    """Tiny: random SDXL and OpenCLIP from ``tiny_seed``. Full: SDXL from ``base_model``, the image tower
    from ``infinite_id.open_clip`` (local only). Either takes the adapter from ``infinite_id.adapter`` (a
    trained export) or starts a fresh one whose face mapper takes ``infinite_id.embedding_space``
    embeddings; ``face_analyzer`` must give embeddings of that space."""
    settings = config.infinite_id
    if face_analyzer is not None and face_analyzer.embedding_space != settings.embedding_space:
        raise ValueError(
            f"the face stack embeds into {face_analyzer.embedding_space} (face.recognizer) but the "
            f"Infinite-ID face mapper takes {settings.embedding_space} (model.infinite_id.embedding_space)"
        )
    arcface_dim = EMBEDDING_DIMS[settings.embedding_space]
    dtype = dtype or default_dtype(config)
    if config.variant == "tiny":
        adapter = None if settings.adapter is None else InfiniteIdAdapter.from_pretrained(settings.adapter)
        pipeline = InfiniteIdPipeline.tiny(
            config.tiny_seed, face_analyzer=face_analyzer, adapter=adapter, arcface_dim=arcface_dim
        )
    else:
        pipeline = InfiniteIdPipeline.from_local(
            config.base_model,
            settings.adapter,
            settings.open_clip,
            face_analyzer=face_analyzer,
            dtype=dtype,
            arcface_dim=arcface_dim,
        )
    # a model already in dtype is not cast again (diffusers warns of every cast)
    return pipeline.to(device) if pipeline.dtype == dtype else pipeline.to(device, dtype)
