"""Training planner: per-GPU memory, FLOPs per sample and days for an InfU (InfuseNet) training setup.

Parameter counts are exact: the real architectures are built on the meta device (no memory). FLOPs are
*model* FLOPs (matmuls only, 2 per multiply-accumulate, no recomputation), the quantity MFU is defined
on: activation checkpointing's extra forward pass is not counted, so the stated MFU must absorb it.
``python -m training plan --config FILE`` prints it for a config's training section.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infu.model.config import LATENT_PIXEL_MULTIPLE, ProjectionConfig

FLUX_DEV = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "in_channels": 64,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
    "patch_size": 1,
}
MLP_RATIO = 4  # FLUX MLP width / hidden width, double and single blocks
TIMESTEP_CHANNELS = 256  # sinusoidal width fed to the timestep (and guidance) embedders
T5_XXL_PARAMS, CLIP_L_PARAMS, VAE_PARAMS = 4_760_000_000, 123_000_000, 84_000_000
FROZEN_DTYPE_BYTES = 2  # text encoders and VAE are kept in bf16
ADAMW_STATE_BYTES = 12  # per trainable parameter: fp32 master copy + two fp32 moments
GATHERED_BLOCKS = 2  # FSDP2 unshards one block while prefetching the next
DOUBLE_BLOCK_SAVED_WIDTHS = 20
"""Activations a double block saves for backward, in hidden widths per token of either stream: input,
modulated norm, q/k/v, q/k after QK-norm+RoPE, attention output, its projection (gated), residual sum,
modulated norm, MLP hidden before and after GELU (4+4), MLP output (gated): 1+1+3+2+1+1+1+1+8+1."""
SINGLE_BLOCK_SAVED_WIDTHS = 22
"""Same for a single block: input, modulated norm, q/k/v, q/k after norm+RoPE, attention output, MLP
hidden before and after GELU (4+4), their concatenation (5), output projection (gated): 1+1+3+2+1+8+5+1."""
GIB = 2**30
PAPER_STAGE1 = {
    "factor": 4,
    "global_batch": 512,
    "micro_batch": 4,
    "steps": 300_000,
    "activation_checkpointing": True,
}
"""The paper's stage 1 (with ``PlanConfig()``: 128 GPUs, 1024 px); micro batch and checkpointing are ours."""


class PlanConfig(BaseModel):
    """The hardware and the fixed parts of a training run the planner sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: int = Field(128, ge=1, description="data-parallel GPUs; FSDP2 shards over all of them")
    gpu_memory_gib: float = Field(80, gt=0, description="memory of one GPU")
    peak_tflops: float = Field(989.0, gt=0, description="dense bf16 peak of one GPU (H100 SXM: 989)")
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation assumed for the run")
    resolution: int = Field(
        1024, ge=LATENT_PIXEL_MULTIPLE, multiple_of=LATENT_PIXEL_MULTIPLE, description="square side (px)"
    )
    text_tokens: int = Field(512, ge=1, description="T5 prompt tokens seen by the base transformer")
    base: dict[str, Any] | None = Field(
        None, description="FluxTransformer2DModel config overrides; unset: FLUX.1-dev"
    )
    text_encoders_resident: bool = Field(
        True,
        description="T5-XXL (4.76B) and CLIP-L (123M) kept in bf16 on every GPU; false: prompt embeddings "
        "precomputed. The VAE (84M) is always resident.",
    )


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    base: int
    infusenet: int
    projection: int


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """Every number of a plan: memory in GiB per GPU, FLOPs per sample."""

    plan: PlanConfig
    factor: int
    global_batch: int
    micro_batch: int
    steps: int
    activation_checkpointing: bool
    accumulation_steps: int
    image_tokens: int
    base_tokens: int
    infusenet_tokens: int
    params: ParameterCounts
    base_params_gib: float
    trainable_params_gib: float
    gradients_gib: float
    optimizer_gib: float
    gathered_blocks_gib: float
    activations_full_gib: float
    activations_checkpointed_gib: float
    frozen_encoders_gib: float
    total_gib: float
    fits: bool
    base_forward_flops: float
    base_backward_flops: float
    infusenet_flops: float
    projection_flops: float
    attention_flops: float
    flops_per_sample: float
    days: float


def accumulation_steps(
    global_batch: int,
    micro_batch: int,
    workers: int,
    micro_batch_name: str = "micro_batch",
    workers_name: str = "workers",
) -> int:
    """Micro batches per worker per optimiser step, ``global_batch / (micro_batch x workers)``; otherwise a
    ``ValueError`` naming the settings as the caller calls them."""
    per_pass = micro_batch * workers
    if per_pass < 1 or global_batch < per_pass or global_batch % per_pass:
        raise ValueError(
            f"global_batch {global_batch} is not a multiple of {micro_batch_name} {micro_batch} x "
            f"{workers_name} {workers} = {per_pass} (a whole number, at least 1, of gradient accumulation "
            "steps)"
        )
    return global_batch // per_pass


def flux_config(plan: PlanConfig) -> dict[str, Any]:
    """The base transformer's config: FLUX.1-dev with the plan's overrides."""
    return {**FLUX_DEV, **(plan.base or {})}


def count_parameters(base: dict[str, Any], factor: int, projection: ProjectionConfig) -> ParameterCounts:
    """Exact parameter counts of the base, its InfuseNet and the projection (built on the meta device).

    On FLUX.1-dev with factor 4: 11.90B base, 2.953B InfuseNet (the paper's "2.95B") and 84.6M projection.
    """
    return _count_parameters(json.dumps(base, sort_keys=True), factor, projection.model_dump_json())


@functools.lru_cache(maxsize=16)
def _count_parameters(base_json: str, factor: int, projection_json: str) -> ParameterCounts:
    import torch
    from diffusers import FluxTransformer2DModel

    from infu.model.infusenet import InfuseNet
    from infu.model.projection import IdentityProjection

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*FluxPosEmbed", FutureWarning)
        transformer = FluxTransformer2DModel(**json.loads(base_json))
        infusenet = InfuseNet.from_transformer(transformer, factor, load_weights_from_transformer=False)
        projection = IdentityProjection.from_projection_config(
            ProjectionConfig.model_validate_json(projection_json)
        )
    return ParameterCounts(count(transformer), count(infusenet), count(projection))


def hidden_width(config: dict[str, Any]) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def dense_macs(config: dict[str, Any], image_tokens: int, text_tokens: int, *, infusenet: bool) -> int:
    """Multiply-accumulates of every linear layer of a FLUX transformer (or InfuseNet) for one sample.

    Each stream's weights of a double block see only that stream's tokens, and the adaLN modulation and
    time/guidance/pooled embedders run once per sample, so this is well below ``N * tokens``.
    """
    hidden = hidden_width(config)
    tokens = image_tokens + text_tokens
    per_token = (4 + 2 * MLP_RATIO) * hidden**2  # q, k, v, out + MLP in/out; same for single blocks
    blocks = config["num_layers"] * (per_token * tokens + 2 * 6 * hidden**2)  # 6-way modulation x 2
    blocks += config["num_single_layers"] * (per_token * tokens + 3 * hidden**2)
    conditioning = (TIMESTEP_CHANNELS * hidden + hidden**2) * (2 if config["guidance_embeds"] else 1)
    conditioning += config["pooled_projection_dim"] * hidden + hidden**2
    embedders = (
        config["in_channels"] * hidden * image_tokens + config["joint_attention_dim"] * hidden * text_tokens
    )
    if infusenet:  # control-latent embedder + one zero-initialised residual projection per block
        blocks_total = config["num_layers"] + config["num_single_layers"]
        output = config["in_channels"] * hidden * image_tokens + blocks_total * hidden**2 * image_tokens
    else:  # norm_out modulation + proj_out to the packed latent channels
        out_channels = config.get("out_channels") or config["in_channels"]
        output = 2 * hidden**2 + hidden * config["patch_size"] ** 2 * out_channels * image_tokens
    return blocks + conditioning + embedders + output


def attention_forward_flops(config: dict[str, Any], tokens: int) -> int:
    """Forward FLOPs of the attention products (QK^T and PV: 2 x 2·tokens²·hidden per block)."""
    return (config["num_layers"] + config["num_single_layers"]) * 4 * tokens**2 * hidden_width(config)


def activation_bytes(config: dict[str, Any], tokens: int, micro_batch: int) -> tuple[int, int, int]:
    """(all blocks' saved activations, all blocks' inputs only, the largest block's) in bytes, bf16."""
    per_width = tokens * hidden_width(config) * micro_batch * 2
    double, single = DOUBLE_BLOCK_SAVED_WIDTHS * per_width, SINGLE_BLOCK_SAVED_WIDTHS * per_width
    full = config["num_layers"] * double + config["num_single_layers"] * single
    inputs = (config["num_layers"] + config["num_single_layers"]) * per_width
    return full, inputs, max(double, single)


def plan_training(
    plan: PlanConfig,
    *,
    factor: int,
    projection: ProjectionConfig,
    global_batch: int,
    micro_batch: int,
    steps: int,
    activation_checkpointing: bool,
    param_dtype_bytes: int = 2,
) -> TrainingPlan:
    """Size a run. FSDP2 shards params, grads (``param_dtype_bytes`` each) and AdamW state (fp32 master +
    moments) over ``plan.gpus``; each GPU also holds two unsharded double blocks, one micro batch's
    activations (plus the InfuseNet residuals waiting for the base) and the frozen encoders. CUDA context
    and allocator fragmentation (a few GiB) are not included.

    The frozen base gets activation gradients only (they flow back to the InfuseNet residuals), InfuseNet
    and projection weight gradients too; attention backward counts 2x its forward. Backward is a slight
    upper estimate: base blocks before the first residual and the input embedders need no gradient.
    """
    from infu.model.infusenet import infusenet_block_counts

    accumulation = accumulation_steps(global_batch, micro_batch, plan.gpus, workers_name="gpus")
    base = flux_config(plan)
    params = count_parameters(base, factor, projection)
    trainable = params.infusenet + params.projection
    layers, single_layers = infusenet_block_counts(base["num_layers"], base["num_single_layers"], factor)
    branch = {**base, "num_layers": layers, "num_single_layers": single_layers}
    image_tokens = (plan.resolution // LATENT_PIXEL_MULTIPLE) ** 2
    base_tokens = image_tokens + plan.text_tokens
    infusenet_tokens = image_tokens + projection.num_queries  # its text stream is the identity tokens

    base_full, base_inputs, base_block = activation_bytes(base, base_tokens, micro_batch)
    branch_full, branch_inputs, branch_block = activation_bytes(branch, infusenet_tokens, micro_batch)
    residuals = (layers + single_layers) * image_tokens * hidden_width(base) * micro_batch * 2
    double_block_weights = (2 * 6 + 2 * (4 + 2 * MLP_RATIO)) * hidden_width(base) ** 2
    # with checkpointing: every block's input, plus the one block being recomputed
    checkpointed = base_inputs + branch_inputs + max(base_block, branch_block)
    encoders = VAE_PARAMS + (T5_XXL_PARAMS + CLIP_L_PARAMS) * plan.text_encoders_resident
    memory = {
        "base_params_gib": params.base * param_dtype_bytes / plan.gpus / GIB,
        "trainable_params_gib": trainable * param_dtype_bytes / plan.gpus / GIB,
        "gradients_gib": trainable * param_dtype_bytes / plan.gpus / GIB,
        "optimizer_gib": trainable * ADAMW_STATE_BYTES / plan.gpus / GIB,
        "gathered_blocks_gib": GATHERED_BLOCKS * double_block_weights * param_dtype_bytes / GIB,
        "frozen_encoders_gib": encoders * FROZEN_DTYPE_BYTES / GIB,
        "activations_full_gib": (base_full + branch_full + residuals) / GIB,
        "activations_checkpointed_gib": (checkpointed + residuals) / GIB,
    }
    unused = "activations_full_gib" if activation_checkpointing else "activations_checkpointed_gib"
    total_gib = sum(value for key, value in memory.items() if key != unused)

    base_dense = 2 * dense_macs(base, image_tokens, plan.text_tokens, infusenet=False)
    branch_dense = 2 * dense_macs(branch, image_tokens, projection.num_queries, infusenet=True)
    base_attention = attention_forward_flops(base, base_tokens)
    flops = {
        "base_forward_flops": base_dense,
        "base_backward_flops": base_dense,  # activation gradients only: one matmul per forward matmul
        "infusenet_flops": 3 * branch_dense,  # forward + activation and weight gradients
        "projection_flops": 6 * params.projection * projection.num_queries,  # upper estimate, tiny
        "attention_flops": 3 * (base_attention + attention_forward_flops(branch, infusenet_tokens)),
    }
    flops_per_sample = sum(flops.values())
    seconds = steps * global_batch * flops_per_sample / (plan.gpus * plan.peak_tflops * 1e12 * plan.mfu)
    return TrainingPlan(
        plan=plan,
        factor=factor,
        global_batch=global_batch,
        micro_batch=micro_batch,
        steps=steps,
        activation_checkpointing=activation_checkpointing,
        accumulation_steps=accumulation,
        image_tokens=image_tokens,
        base_tokens=base_tokens,
        infusenet_tokens=infusenet_tokens,
        params=params,
        **memory,
        total_gib=total_gib,
        fits=total_gib <= plan.gpu_memory_gib,
        **flops,
        flops_per_sample=flops_per_sample,
        days=seconds / 86400,
    )


def _billions(count: int) -> str:
    return f"{count / 1e9:.3f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def format_plan(report: TrainingPlan) -> str:
    """A readable table of the plan (memory per GPU, FLOPs per sample, days)."""
    plan, params = report.plan, report.params
    checkpointed = report.activation_checkpointing
    encoders = (
        "T5-XXL + CLIP-L + VAE" if plan.text_encoders_resident else "VAE (prompt embeddings precomputed)"
    )
    memory = [
        ("base params (frozen, sharded)", report.base_params_gib),
        ("trainable params (sharded)", report.trainable_params_gib),
        ("gradients (sharded)", report.gradients_gib),
        ("AdamW: fp32 master + 2 moments (sharded)", report.optimizer_gib),
        (f"FSDP all-gathered blocks ({GATHERED_BLOCKS})", report.gathered_blocks_gib),
        (f"activations, checkpointed{' *' if checkpointed else ''}", report.activations_checkpointed_gib),
        (f"activations, no checkpointing{'' if checkpointed else ' *'}", report.activations_full_gib),
        (f"{encoders}, bf16", report.frozen_encoders_gib),
    ]
    flops = [
        ("base forward", report.base_forward_flops),
        ("base backward (activation grads only)", report.base_backward_flops),
        ("InfuseNet forward + backward", report.infusenet_flops),
        ("projection forward + backward", report.projection_flops),
        ("attention QK^T, PV (forward + 2x backward)", report.attention_flops),
    ]
    verdict = "fits" if report.fits else "does not fit"
    lines = [
        f"InfU training plan: {plan.gpus} GPUs x {plan.gpu_memory_gib:g} GiB, {plan.resolution}px, "
        f"factor {report.factor}",
        f"tokens: base {report.base_tokens} ({report.image_tokens} image + {plan.text_tokens} text), "
        f"InfuseNet {report.infusenet_tokens}",
        f"params: base {_billions(params.base)} frozen, InfuseNet {_billions(params.infusenet)} + projection "
        f"{_billions(params.projection)} = {_billions(params.infusenet + params.projection)} trainable",
        f"batch: global {report.global_batch} = micro {report.micro_batch} x {plan.gpus} GPUs x "
        f"{report.accumulation_steps} accumulation steps",
        "",
        "memory per GPU                                     GiB   (* = configured)",
        *(f"  {label:<46}{value:>8.2f}" for label, value in memory),
        f"  {'total':<46}{report.total_gib:>8.2f}",
        f"  {verdict}: {report.total_gib:.2f} of {plan.gpu_memory_gib:g} GiB per GPU",
        "",
        "FLOPs per sample                                TFLOP",
        *(f"  {label:<46}{value / 1e12:>8.2f}" for label, value in flops),
        f"  {'total':<46}{report.flops_per_sample / 1e12:>8.2f}",
        "",
        f"{report.steps} steps x {report.global_batch} samples at {plan.mfu:.0%} MFU of "
        f"{plan.peak_tflops:g} TFLOP/s x {plan.gpus} GPUs: {report.days:.1f} days",
    ]
    return "\n".join(lines)
