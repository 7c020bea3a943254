"""Training planner: exact parameter counts, FLOPs (by hand and measured), memory, days, errors, table."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from infu.model.config import TINY_PROJECTION, ProjectionConfig
from infu.model.infusenet import InfuseNet, infused_velocity
from training.plan import PAPER_STAGE1, PlanConfig, flux_config, format_plan, plan_training

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

TINY_BASE = {
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
TINY_PLAN = PlanConfig(gpus=1, resolution=64, text_tokens=32, base=TINY_BASE)
TINY_PROJECTION_CONFIG = ProjectionConfig(**TINY_PROJECTION)
TINY_FACTOR = 2  # InfuseNet: 1 double + 2 single blocks


def tiny_plan(micro_batch: int = 2, checkpointing: bool = False):
    return plan_training(
        TINY_PLAN,
        factor=TINY_FACTOR,
        projection=TINY_PROJECTION_CONFIG,
        global_batch=micro_batch,
        micro_batch=micro_batch,
        steps=10,
        activation_checkpointing=checkpointing,
    )


@pytest.fixture(scope="module")
def paper():
    return plan_training(PlanConfig(), projection=ProjectionConfig(), **PAPER_STAGE1)


def test_flux_dev_parameter_counts(paper):
    params = paper.params
    assert params.base == pytest.approx(11.9e9, rel=0.01)
    assert params.base == 11_901_408_320
    # the paper's "InfuseNet 2.95B" is the InfuseNet alone; the release projection adds 84.6M
    assert params.infusenet == 2_952_654_336
    assert params.infusenet == pytest.approx(2.95e9, rel=0.005)
    assert params.projection == 84_595_968
    assert params.infusenet + params.projection == pytest.approx(2.95e9, rel=0.05)


def test_paper_flops_within_plausible_bounds(paper):
    """Lower bound: training the trainable weights alone as if each saw every image token (6·N·D);
    the frozen 12B base's forward and backward come on top. Upper bound: every weight trainable and
    applied to every base token, plus attention forward + 2x backward in all blocks at base length."""
    params, tokens = paper.params, paper.base_tokens
    trainable = params.infusenet + params.projection
    lower = 6 * trainable * paper.image_tokens
    hidden, blocks = 3072, 19 + 38 + 4 + 10
    upper = 6 * (params.base + trainable) * tokens + 3 * blocks * 4 * tokens**2 * hidden
    assert lower < paper.flops_per_sample < upper
    assert 1.5e14 < paper.flops_per_sample < 3e14
    parts = (
        paper.base_forward_flops,
        paper.base_backward_flops,
        paper.infusenet_flops,
        paper.projection_flops,
        paper.attention_flops,
    )
    assert paper.flops_per_sample == pytest.approx(sum(parts))
    seconds = 300_000 * 512 * paper.flops_per_sample / (128 * 989e12 * 0.4)
    assert paper.days == pytest.approx(seconds / 86400)


def linear_flops(layers: list[tuple[int, int, int]]) -> int:
    """2 FLOPs per multiply-accumulate of (in_features, out_features, rows) linear layers."""
    return sum(2 * fan_in * fan_out * rows for fan_in, fan_out, rows in layers)


def test_tiny_flops_equal_hand_count():
    h, image, text, queries = 32, 16, 32, 8  # 2 heads x 16; (64 / 16)^2 image tokens
    conditioning = [(256, h, 1), (h, h, 1), (256, h, 1), (h, h, 1), (32, h, 1), (h, h, 1)]

    def stream(rows: int) -> list[tuple[int, int, int]]:  # modulation, q/k/v, out, MLP in/out
        return [(h, 6 * h, 1), (h, 3 * h, rows), (h, h, rows), (h, 4 * h, rows), (4 * h, h, rows)]

    def double_block(context: int) -> list[tuple[int, int, int]]:
        return stream(image) + stream(context)

    def single_block(tokens: int) -> list[tuple[int, int, int]]:  # modulation, q/k/v, MLP in, out
        return [(h, 3 * h, 1), (h, 3 * h, tokens), (h, 4 * h, tokens), (5 * h, h, tokens)]

    base = conditioning + [(64, h, image), (32, h, text), (h, 2 * h, 1), (h, 64, image)]
    base += 2 * double_block(text) + 4 * single_block(image + text)
    infusenet = conditioning + [(64, h, image), (32, h, queries), (64, h, image), *3 * [(h, h, image)]]
    infusenet += double_block(queries) + 2 * single_block(image + queries)
    attention = 4 * h * (6 * (image + text) ** 2 + 3 * (image + queries) ** 2)

    report = tiny_plan()
    assert report.base_forward_flops == linear_flops(base)
    assert report.base_backward_flops == linear_flops(base)
    assert report.infusenet_flops == 3 * linear_flops(infusenet)
    assert report.attention_flops == 3 * attention
    assert report.projection_flops == 6 * report.params.projection * queries
    expected = 2 * linear_flops(base) + 3 * linear_flops(infusenet) + 3 * attention + report.projection_flops
    assert report.flops_per_sample == expected


def test_tiny_flops_match_torch_flop_counter():
    """Measured on the real modules: forward exactly; forward + backward a bit below the plan, which
    also counts gradients the first base block and the input embedders do not need."""
    report = tiny_plan()
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**flux_config(TINY_PLAN)).requires_grad_(False)
    infusenet = InfuseNet.from_transformer(base, TINY_FACTOR)
    batch, side = 2, 4
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = {
        "latents": torch.randn(batch, side * side, 64),
        "timestep": torch.rand(batch),
        "prompt_embeds": torch.randn(batch, 32, 32),
        "pooled_prompt_embeds": torch.randn(batch, 32),
        "text_ids": torch.zeros(32, 3),
        "img_ids": img_ids.reshape(-1, 3),
        "id_tokens": torch.randn(batch, 8, 32),
        "control_latents": torch.randn(batch, side * side, 64),
    }
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_only:
        infused_velocity(base, infusenet, **inputs)
    planned_forward = report.base_forward_flops + (report.infusenet_flops + report.attention_flops) / 3
    assert forward_only.get_total_flops() == batch * planned_forward

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as training_step:
        infused_velocity(base, infusenet, **inputs).pow(2).mean().backward()
    planned = batch * (report.flops_per_sample - report.projection_flops)
    assert 0.85 * planned < training_step.get_total_flops() <= planned


def test_checkpointing_lowers_activation_memory(paper):
    assert paper.activations_checkpointed_gib < paper.activations_full_gib / 5
    settings = {**PAPER_STAGE1, "activation_checkpointing": False}
    without = plan_training(PlanConfig(), projection=ProjectionConfig(), **settings)
    assert without.activations_full_gib == paper.activations_full_gib
    assert without.total_gib - paper.total_gib == pytest.approx(
        paper.activations_full_gib - paper.activations_checkpointed_gib
    )
    assert paper.fits and not without.fits
    tiny = tiny_plan(checkpointing=True)
    assert tiny.activations_checkpointed_gib < tiny.activations_full_gib
    assert tiny_plan(micro_batch=4).activations_full_gib == pytest.approx(2 * tiny.activations_full_gib)


def test_days_scale_inversely_with_gpus_and_mfu(paper):
    projection = ProjectionConfig()
    half_gpus = plan_training(PlanConfig(gpus=64), projection=projection, **PAPER_STAGE1)
    assert half_gpus.accumulation_steps == 2
    assert half_gpus.days == pytest.approx(2 * paper.days)
    half_mfu = plan_training(PlanConfig(mfu=0.2), projection=projection, **PAPER_STAGE1)
    assert half_mfu.days == pytest.approx(2 * paper.days)
    assert half_gpus.flops_per_sample == paper.flops_per_sample


@pytest.mark.parametrize("global_batch", [500, 256, 0])
def test_batch_that_is_not_whole_accumulation_steps_raises(global_batch):
    settings = {**PAPER_STAGE1, "global_batch": global_batch}
    with pytest.raises(ValueError, match=r"is not a multiple of micro_batch 4 x gpus 128 = 512"):
        plan_training(PlanConfig(), projection=ProjectionConfig(), **settings)


def test_plan_config_validation():
    for bad in ({"resolution": 1000}, {"mfu": 0}, {"mfu": 1.5}, {"gpus": 0}, {"batch": 4}):
        with pytest.raises(pydantic.ValidationError):
            PlanConfig(**bad)


def test_format_plan_shows_the_key_lines(paper):
    text = format_plan(paper)
    for needle in ("11.901B", "2.953B", "GiB", "activations, checkpointed *", "fits: ", "TFLOP", "days"):
        assert needle in text
    assert "does not fit" not in text
    small = plan_training(PlanConfig(gpu_memory_gib=16), projection=ProjectionConfig(), **PAPER_STAGE1)
    assert "does not fit: " in format_plan(small)
    precomputed = plan_training(
        PlanConfig(text_encoders_resident=False), projection=ProjectionConfig(), **PAPER_STAGE1
    )
    assert precomputed.frozen_encoders_gib < 0.2 < paper.frozen_encoders_gib
    assert "prompt embeddings precomputed" in format_plan(precomputed)


def test_the_plan_command_reads_a_config_training_section():
    from typer.testing import CliRunner

    from training.cli import app

    config = Path(__file__).resolve().parents[1] / "configs" / "flux-dev.yaml"
    result = CliRunner().invoke(app, ["plan", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "300000 steps x 512 samples at 40% MFU of 989 TFLOP/s x 128 GPUs: 7.5 days" in result.output
    small = CliRunner().invoke(app, ["plan", "--config", str(config), "--set", "stage1.plan.gpus=64"])
    days = {
        gpus: float(re.search(rf"x {gpus} GPUs: ([\d.]+) days", out).group(1))
        for gpus, out in ((128, result.output), (64, small.output))
    }
    assert days[64] == pytest.approx(2 * days[128], abs=0.1)
