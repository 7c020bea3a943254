"""InfuseNet: block counts, zero init, training signal, residual grouping, scale and compatibility."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from infu.model.infusenet import (
    InfuseNet,
    check_compatible,
    infused_velocity,
    infusenet_block_counts,
    residual_groups,
)
from infu.model.tiny import tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

JOINT_DIM = 32
LATENT_SIDE = 4  # packed 4 x 4 = 16 image tokens


def make_inputs(transformer: FluxTransformer2DModel, batch: int = 1, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = LATENT_SIDE * LATENT_SIDE
    img_ids = torch.zeros(LATENT_SIDE, LATENT_SIDE, 3)
    img_ids[..., 1] = torch.arange(LATENT_SIDE)[:, None]
    img_ids[..., 2] = torch.arange(LATENT_SIDE)[None, :]
    return {
        "latents": torch.randn(batch, tokens, 64, generator=generator),
        "timestep": torch.full((batch,), 0.7),
        "prompt_embeds": torch.randn(batch, 6, JOINT_DIM, generator=generator),
        "pooled_prompt_embeds": torch.randn(
            batch, transformer.config.pooled_projection_dim, generator=generator
        ),
        "text_ids": torch.zeros(6, 3),
        "img_ids": img_ids.reshape(tokens, 3),
        "id_tokens": torch.randn(batch, 8, JOINT_DIM, generator=generator),
        "control_latents": torch.randn(batch, tokens, 64, generator=generator),
    }


def base_prediction(transformer: FluxTransformer2DModel, inputs: dict, guidance: float = 3.5) -> torch.Tensor:
    return transformer(
        hidden_states=inputs["latents"],
        timestep=inputs["timestep"],
        guidance=torch.full_like(inputs["timestep"], guidance),
        pooled_projections=inputs["pooled_prompt_embeds"],
        encoder_hidden_states=inputs["prompt_embeds"],
        txt_ids=inputs["text_ids"],
        img_ids=inputs["img_ids"],
        return_dict=False,
    )[0]


def randomise_outputs(infusenet: InfuseNet, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in [*infusenet.controlnet_blocks, *infusenet.controlnet_single_blocks]:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.1)
        infusenet.controlnet_x_embedder.weight.copy_(
            torch.randn(infusenet.controlnet_x_embedder.weight.shape, generator=generator) * 0.1
        )


@pytest.fixture(scope="module")
def small_pair() -> tuple[FluxTransformer2DModel, InfuseNet]:
    torch.manual_seed(0)
    transformer = tiny_transformer(num_layers=4, num_single_layers=8, joint_attention_dim=JOINT_DIM).eval()
    return transformer, InfuseNet.from_transformer(transformer, factor=4).eval()


def test_block_counts_of_the_release():
    assert infusenet_block_counts(19, 38, 4) == (4, 10)
    assert infusenet_block_counts(19, 38, 1) == (19, 38)
    assert infusenet_block_counts(2, 4, 8) == (1, 1)
    with pytest.raises(ValueError):
        infusenet_block_counts(19, 38, 0)


def test_full_size_infusenet_on_meta():
    with torch.device("meta"):
        base = FluxTransformer2DModel(guidance_embeds=True)
        infusenet = InfuseNet.from_transformer(base, factor=4, load_weights_from_transformer=False)
    config = infusenet.config
    assert (config.num_layers, config.num_single_layers) == (4, 10)
    assert (config.in_channels, config.joint_attention_dim, config.pooled_projection_dim) == (64, 4096, 768)
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 128)
    assert list(config.axes_dims_rope) == [16, 56, 56] and config.guidance_embeds
    count = sum(parameter.numel() for parameter in infusenet.parameters())
    print(f"\nInfuseNet parameters (full size, i=4): {count:,}")
    assert 2.9e9 < count < 3.0e9
    assert residual_groups(19, 4) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 4
    assert residual_groups(38, 10) == [index // 4 for index in range(38)]


def test_copies_base_weights_and_saves_as_a_release_controlnet(small_pair, tmp_path):
    transformer, infusenet = small_pair
    assert torch.equal(infusenet.x_embedder.weight, transformer.x_embedder.weight)
    assert torch.equal(
        infusenet.single_transformer_blocks[1].proj_out.weight,
        transformer.single_transformer_blocks[1].proj_out.weight,
    )
    infusenet.save_pretrained(tmp_path)
    assert '"_class_name": "FluxControlNetModel"' in (tmp_path / "config.json").read_text()


def test_zero_initialised_infusenet_leaves_the_base_unchanged_then_learns(small_pair):
    transformer, _ = small_pair
    infusenet = InfuseNet.from_transformer(transformer, factor=4)
    transformer.requires_grad_(False)
    inputs = make_inputs(transformer)
    base = base_prediction(transformer, inputs)
    infused = infused_velocity(transformer, infusenet, **inputs)
    assert torch.equal(infused, base)

    optimizer = torch.optim.AdamW(infusenet.parameters(), lr=1e-3)
    loss = (infused_velocity(transformer, infusenet, **inputs) - torch.randn_like(base)).pow(2).mean()
    loss.backward()
    assert infusenet.controlnet_blocks[0].weight.grad.abs().sum() > 0
    assert transformer.x_embedder.weight.grad is None
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(infused_velocity(transformer, infusenet, **inputs), base)


def test_scale_zero_skips_and_scale_is_linear_in_the_residuals(small_pair):
    transformer, infusenet = small_pair
    infusenet = InfuseNet.from_transformer(transformer, factor=4)
    randomise_outputs(infusenet)
    inputs = make_inputs(transformer)
    with torch.no_grad():
        base = base_prediction(transformer, inputs)
        assert torch.equal(infused_velocity(transformer, infusenet, **inputs, infusenet_scale=0.0), base)
        assert not torch.allclose(infused_velocity(transformer, infusenet, **inputs), base)
        double, single = infusenet.identity_residuals(
            latents=inputs["latents"],
            control_latents=inputs["control_latents"],
            id_tokens=inputs["id_tokens"],
            pooled_prompt_embeds=inputs["pooled_prompt_embeds"],
            timestep=inputs["timestep"],
            img_ids=inputs["img_ids"],
            guidance=torch.ones(1),
            conditioning_scale=1.0,
        )
        halved, _ = infusenet.identity_residuals(
            latents=inputs["latents"],
            control_latents=inputs["control_latents"],
            id_tokens=inputs["id_tokens"],
            pooled_prompt_embeds=inputs["pooled_prompt_embeds"],
            timestep=inputs["timestep"],
            img_ids=inputs["img_ids"],
            guidance=torch.ones(1),
            conditioning_scale=0.5,
        )
    assert (len(double), len(single)) == (1, 2)
    torch.testing.assert_close(halved[0], double[0] * 0.5)


def test_identity_tokens_not_the_prompt_drive_the_infusenet(small_pair):
    transformer, _ = small_pair
    infusenet = InfuseNet.from_transformer(transformer, factor=4)
    randomise_outputs(infusenet)
    inputs = make_inputs(transformer)
    seen = {}
    infusenet.context_embedder.register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    with torch.no_grad():
        first = infused_velocity(transformer, infusenet, **inputs)
        assert torch.equal(seen["input"], inputs["id_tokens"])
        other_identity = infused_velocity(
            transformer, infusenet, **{**inputs, "id_tokens": inputs["id_tokens"] + 1}
        )
    assert not torch.allclose(first, other_identity)


def test_residual_grouping_follows_the_interval_rule_on_19_plus_38_blocks():
    torch.manual_seed(0)
    transformer = tiny_transformer(num_layers=19, num_single_layers=38, joint_attention_dim=JOINT_DIM).eval()
    infusenet = InfuseNet.from_transformer(transformer, factor=4).eval()
    assert (len(infusenet.transformer_blocks), len(infusenet.single_transformer_blocks)) == (4, 10)
    randomise_outputs(infusenet)
    scale = 0.75

    residuals: dict[str, list[torch.Tensor]] = {"double": [], "single": []}
    for kind, blocks in (
        ("double", infusenet.controlnet_blocks),
        ("single", infusenet.controlnet_single_blocks),
    ):
        for block in blocks:
            block.register_forward_hook(
                lambda module, args, out, kind=kind: residuals[kind].append(out * scale)
            )

    # What each base block returns, and what the next consumer receives: the difference is the residual.
    outputs: dict[str, list[torch.Tensor]] = {"double": [], "single": []}
    inputs_after: dict[str, list[torch.Tensor]] = {"double": [], "single": []}
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    for kind, blocks in (("double", doubles), ("single", singles)):
        for block in blocks:
            block.register_forward_hook(
                lambda module, args, kwargs, out, kind=kind: outputs[kind].append(out[1]), with_kwargs=True
            )
    consumers = [("double", block) for block in doubles[1:] + singles[:1]] + [
        ("single", b) for b in singles[1:]
    ]
    for kind, block in consumers:
        block.register_forward_pre_hook(
            lambda module, args, kwargs, kind=kind: inputs_after[kind].append(kwargs["hidden_states"]),
            with_kwargs=True,
        )
    transformer.norm_out.register_forward_pre_hook(
        lambda module, args: inputs_after["single"].append(args[0])
    )

    inputs = make_inputs(transformer)
    with torch.no_grad():
        infused_velocity(transformer, infusenet, **inputs, infusenet_scale=scale)

    for kind, num_blocks in (("double", 19), ("single", 38)):
        assert len(outputs[kind]) == len(inputs_after[kind]) == num_blocks
        groups = residual_groups(num_blocks, len(residuals[kind]))
        for block, group in enumerate(groups):
            added = inputs_after[kind][block] - outputs[kind][block]
            torch.testing.assert_close(added, residuals[kind][group], rtol=1e-4, atol=1e-5)
    assert residual_groups(19, 4)[:6] == [0, 0, 0, 0, 0, 1]
    assert residual_groups(38, 10)[:5] == [0, 0, 0, 0, 1]


def test_incompatible_pairs_are_rejected():
    torch.manual_seed(0)
    transformer = tiny_transformer(num_layers=4, num_single_layers=8, joint_attention_dim=JOINT_DIM)
    check_compatible(transformer, InfuseNet.from_transformer(transformer, factor=2))
    other_width = tiny_transformer(num_layers=4, num_single_layers=8, joint_attention_dim=48)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        check_compatible(transformer, InfuseNet.from_transformer(other_width))
    deeper = tiny_transformer(num_layers=8, num_single_layers=8, joint_attention_dim=JOINT_DIM)
    with pytest.raises(ValueError, match="cannot be spread"):
        check_compatible(transformer, InfuseNet.from_transformer(deeper, factor=1))
