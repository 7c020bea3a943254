"""8-bit weights (optimum-quanto) for the FLUX transformer and the InfuseNet, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optimum.quanto import QLinear

from infu.model.config import ModelConfig
from infu.model.factory import build_pipeline, quantize_weights

from .test_model_pipeline import TINY, run, trained

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")
EIGHT_BIT = {"float8": torch.float8_e4m3fn, "int8": torch.int8}


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("weights", ["float8", "int8"])
def test_config_switch_quantizes_every_linear_of_transformer_and_infusenet(weights):
    plain = build_pipeline(TINY)
    quantized = build_pipeline(TINY.model_copy(update={"quantize": weights}))
    for name in ("transformer", "infusenet"):
        before = linear_layers(getattr(plain, name))
        after = linear_layers(getattr(quantized, name))
        assert len(after) == len(before) > 0
        assert all(isinstance(layer, QLinear) for layer in after)
        assert {layer.weight._data.dtype for layer in after} == {EIGHT_BIT[weights]}
    assert not any(isinstance(layer, QLinear) for layer in linear_layers(quantized.text_encoder_2))


def test_quantized_images_stay_close_to_full_precision():
    reference = trained(build_pipeline(TINY))
    reference.set_progress_bar_config(disable=True)
    full = run(reference)
    quantize_weights(reference, "int8")
    quantized = run(reference)
    assert np.isfinite(quantized).all() and not np.array_equal(quantized, full)
    assert np.abs(quantized - full).mean() < 0.02


def test_unfused_loras_cannot_be_quantized():
    with pytest.raises(ValueError, match="needs fuse_loras: true"):
        ModelConfig(**{**TINY.model_dump(), "quantize": "int8", "loras": [{"path": "a.safetensors"}]})
