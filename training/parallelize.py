"""How the models are spread over the workers: FSDP2 (``fully_shard``) per transformer block of the frozen
base and of the InfuseNet, then each model as a whole; the projection as one unit; optional activation
checkpointing (diffusers' gradient checkpointing, block by block)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from infu.model.infu import InfU

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def mixed_precision(param_dtype: torch.dtype, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPUs; plain fp32 on CPU (gloo)."""
    if device.type == "cuda" and param_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, policy: MixedPrecisionPolicy) -> None:
    """``fully_shard`` each block of a FLUX-style model, then the model (its embedders and heads)."""
    for name in BLOCK_LISTS:
        for block in getattr(model, name):
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def parallelize(
    transformer: FluxTransformer2DModel,
    infu: InfU,
    *,
    fsdp: bool,
    activation_checkpointing: bool,
    param_dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Freeze the base, train InfuseNet + projection; shard both models (in place) when ``fsdp``."""
    transformer.requires_grad_(False)
    infu.requires_grad_(True)
    if activation_checkpointing:
        transformer.enable_gradient_checkpointing()
        infu.infusenet.enable_gradient_checkpointing()
    if not fsdp:
        return
    policy = mixed_precision(param_dtype, device)
    shard_model(transformer, policy)
    shard_model(infu.infusenet, policy)
    fully_shard(infu.projection, mp_policy=policy)
