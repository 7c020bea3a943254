"""Infinite-ID model layer: attention math by hand, processors on a tiny SDXL-like UNet, adapter I/O."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file, save_file

from infu.model.infinite_id import (
    ATTENTION_KWARGS,
    IdentityCrossAttnProcessor,
    IdentityEncoder,
    InfiniteIdAdapter,
    MixedSelfAttnProcessor,
    adain,
    adain_mean,
    identity_layer_dims,
    install_identity_processors,
    mix_identities,
)
from infu.model.infinite_id.adapter import ADAPTER_WEIGHTS

TEXT_DIM = 32
TINY_ENCODER = {
    "clip_dim": 24,
    "arcface_dim": 16,
    "cross_attention_dim": TEXT_DIM,
    "clip_tokens": 3,
    "face_tokens": 2,
    "clip_width": 16,
    "clip_depth": 1,
    "clip_heads": 2,
    "clip_head_dim": 8,
    "ff_mult": 2,
}


def hand_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` written out with Python loops, one head, ``[N, d]`` tensors."""
    rows = []
    for q in query.tolist():
        scores = [sum(a * b for a, b in zip(q, k, strict=True)) / math.sqrt(len(q)) for k in keys.tolist()]
        top = max(scores)
        weights = [math.exp(score - top) for score in scores]
        total = sum(weights)
        rows.append(
            [
                sum(w / total * v[c] for w, v in zip(weights, values.tolist(), strict=True))
                for c in range(len(q))
            ]
        )
    return torch.tensor(rows)


def identity_attention(dim: int, identity_dim: int | None = None) -> Attention:
    """One head, identity projections and output (``to_q``/``to_k``/``to_v``/``to_out`` = I)."""
    attn = Attention(query_dim=dim, cross_attention_dim=identity_dim, heads=1, dim_head=dim, out_bias=False)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_out[0]):
            linear.weight.copy_(torch.eye(dim))
        for linear in (attn.to_k, attn.to_v):
            linear.weight.copy_(torch.eye(dim, identity_dim or dim))
    return attn


def test_mixed_attention_matches_hand_computation():
    torch.manual_seed(0)
    attn = identity_attention(4)
    identity_stream, text_stream = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    out = MixedSelfAttnProcessor()(attn, torch.cat([identity_stream, text_stream]), mode="mixed")
    x_id, x_t = identity_stream[0], text_stream[0]
    both = torch.cat([x_id, x_t])
    torch.testing.assert_close(out[0], hand_attention(x_id, both, both), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], hand_attention(x_t, x_t, x_t), atol=1e-5, rtol=0)


def test_mutual_attention_uses_only_the_text_stream_keys_and_values():
    torch.manual_seed(1)
    attn = identity_attention(4)
    identity_stream, text_stream = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    out = MixedSelfAttnProcessor()(attn, torch.cat([identity_stream, text_stream]), mode="mutual")
    x_id, x_t = identity_stream[0], text_stream[0]
    torch.testing.assert_close(out[0], hand_attention(x_id, x_t, x_t), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], hand_attention(x_t, x_t, x_t), atol=1e-5, rtol=0)


def test_mixed_attention_with_adain_mean_aligns_identity_queries_and_keys():
    torch.manual_seed(2)
    attn = identity_attention(4)
    identity_stream, text_stream = torch.randn(1, 3, 4) + 2.0, torch.randn(1, 3, 4)
    out = MixedSelfAttnProcessor()(
        attn, torch.cat([identity_stream, text_stream]), mode="mixed", adain="mean"
    )
    x_id, x_t = identity_stream[0], text_stream[0]
    aligned = x_id - x_id.mean(0) + x_t.mean(0)
    expected = hand_attention(aligned, torch.cat([aligned, x_t]), torch.cat([x_id, x_t]))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_cross_attention_merge_is_the_sum_of_text_and_identity_branches():
    torch.manual_seed(3)
    attn = identity_attention(4, identity_dim=4)
    processor = IdentityCrossAttnProcessor(hidden_size=4, identity_dim=4)
    with torch.no_grad():
        processor.to_k_id.weight.copy_(torch.eye(4))
        processor.to_v_id.weight.copy_(2 * torch.eye(4))
    pixels, text, identity = torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    text_branch = hand_attention(pixels[0], text[0], text[0])
    identity_branch = hand_attention(pixels[0], identity[0], 2 * identity[0])

    merged = processor(attn, pixels, text, identity=identity, text_scale=0.5, identity_scale=0.7)
    torch.testing.assert_close(merged[0], 0.5 * text_branch + 0.7 * identity_branch, atol=1e-5, rtol=0)
    identity_only = processor(attn, pixels, text, identity=identity, text_scale=0.0)
    torch.testing.assert_close(identity_only[0], identity_branch, atol=1e-5, rtol=0)
    text_only = processor(attn, pixels, text, identity=identity, identity_scale=0.0)
    torch.testing.assert_close(text_only[0], text_branch, atol=1e-5, rtol=0)


def test_two_stream_cross_attention_adds_identity_to_the_identity_half_only():
    torch.manual_seed(4)
    attn = identity_attention(4, identity_dim=4)
    processor = IdentityCrossAttnProcessor(hidden_size=4, identity_dim=4)
    pixels, text, identity = torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.randn(1, 2, 4)
    out = processor(attn, pixels, text, identity=identity, mode="mixed")
    plain_text = processor(attn, pixels, text)
    torch.testing.assert_close(out[1], plain_text[1], atol=0, rtol=0)
    plain_merge = processor(attn, pixels[:1], text[:1], identity=identity)
    torch.testing.assert_close(out[0], plain_merge[0], atol=1e-6, rtol=0)


def test_adain_mean_moves_the_mean_and_keeps_the_variance():
    torch.manual_seed(5)
    content, reference = 3 * torch.randn(2, 16, 5) + 1, torch.randn(2, 9, 5) - 4
    out = adain_mean(content, reference)
    torch.testing.assert_close(out.mean(1), reference.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1), content.var(1), atol=1e-4, rtol=0)
    assert not torch.allclose(out.var(1), reference.var(1), atol=0.1)


def test_adain_matches_mean_and_std():
    torch.manual_seed(6)
    content, reference = 3 * torch.randn(2, 16, 5) + 1, 0.5 * torch.randn(2, 9, 5) - 4
    out = adain(content, reference)
    torch.testing.assert_close(out.mean(1), reference.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.std(1, unbiased=False), reference.std(1, unbiased=False), atol=1e-4, rtol=0
    )


def test_processors_reject_unknown_modes_and_adain_without_two_streams():
    attn = identity_attention(4)
    with pytest.raises(ValueError, match="mode"):
        MixedSelfAttnProcessor()(attn, torch.randn(2, 3, 4), mode="blend")
    with pytest.raises(ValueError, match="adain"):
        MixedSelfAttnProcessor()(attn, torch.randn(2, 3, 4), adain="mean")
    with pytest.raises(ValueError, match="halves"):
        MixedSelfAttnProcessor()(attn, torch.randn(3, 3, 4), mode="mixed")


def test_both_processors_declare_every_infinite_id_kwarg():
    """Attention.forward drops (and warns about) cross_attention_kwargs missing from the signature."""
    for processor in (IdentityCrossAttnProcessor(4, 4), MixedSelfAttnProcessor()):
        assert set(ATTENTION_KWARGS) <= set(inspect.signature(processor.__call__).parameters)


def test_mix_identities_is_the_normalised_weighted_mean():
    first, second = torch.ones(1, 2, 3), torch.full((1, 2, 3), 4.0)
    torch.testing.assert_close(mix_identities([first, second], [1, 3]), torch.full((1, 2, 3), 3.25))
    torch.testing.assert_close(mix_identities([first, second]), torch.full((1, 2, 3), 2.5))
    with pytest.raises(ValueError, match="shape"):
        mix_identities([first, torch.ones(1, 3, 3)])


def test_identity_encoder_concatenates_clip_and_face_tokens():
    encoder = IdentityEncoder(**TINY_ENCODER)
    clip, arcface = torch.randn(2, 257, 24), torch.randn(2, 16)
    tokens = encoder(clip, arcface)
    assert tokens.shape == (2, 5, TEXT_DIM) and encoder.num_tokens == 5
    assert torch.equal(tokens[:, :3], encoder.clip_mapper(clip))
    assert torch.equal(tokens[:, 3:], encoder.face_mapper(arcface))
    with pytest.raises(ValueError, match="ArcFace"):
        encoder(clip, torch.randn(2, 512))


def tiny_sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        transformer_layers_per_block=1,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
    )


def unet_inputs(batch: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, TEXT_DIM, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, TEXT_DIM, generator=generator),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(batch, 1),
        },
    }


def test_sdxl_has_70_cross_attention_layers():
    sdxl = {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    with torch.device("meta"):
        dims = identity_layer_dims(UNet2DConditionModel(**sdxl))
    assert len(dims) == 70
    assert sorted(set(dims.values())) == [640, 1280]


def test_identity_enhanced_training_gives_no_gradient_to_text_key_values():
    unet = tiny_sdxl_unet()
    encoder = IdentityEncoder(**TINY_ENCODER)
    processors = install_identity_processors(unet, identity_dim=TEXT_DIM)
    assert len(processors) == 4
    identity = encoder(torch.randn(2, 257, 24), torch.randn(2, 16))
    out = unet(**unet_inputs(2), cross_attention_kwargs={"identity": identity, "text_scale": 0.0}).sample
    out.square().mean().backward()

    cross_attentions = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(cross_attentions) == 4
    for attn in cross_attentions:
        assert attn.to_k.weight.grad is None and attn.to_v.weight.grad is None
    for processor in processors.values():
        assert processor.to_k_id.weight.grad.abs().sum() > 0
        assert processor.to_v_id.weight.grad.abs().sum() > 0
    for mapper in (encoder.clip_mapper, encoder.face_mapper):
        assert sum(p.grad.abs().sum() for p in mapper.parameters()) > 0
    assert all(p.grad is not None for p in encoder.parameters())


def test_plain_mode_without_identity_reproduces_the_original_unet_exactly():
    unet = tiny_sdxl_unet()
    with torch.no_grad():
        original = unet(**unet_inputs(2)).sample
        install_identity_processors(unet, identity_dim=TEXT_DIM)
        identity = torch.randn(2, 5, TEXT_DIM)
        kwargs = {"identity": identity, "identity_scale": 0.0, "text_scale": 1.0, "mode": "plain"}
        assert torch.equal(unet(**unet_inputs(2), cross_attention_kwargs=kwargs).sample, original)
        with_identity = unet(**unet_inputs(2), cross_attention_kwargs={"identity": identity}).sample
    assert (with_identity - original).abs().max() > 1e-4


def test_two_stream_modes_leave_the_text_stream_as_the_plain_unet():
    unet = tiny_sdxl_unet()
    inputs = unet_inputs(2)
    text_row = {
        "sample": inputs["sample"][1:],
        "timestep": inputs["timestep"],
        "encoder_hidden_states": inputs["encoder_hidden_states"][1:],
        "added_cond_kwargs": {key: value[1:] for key, value in inputs["added_cond_kwargs"].items()},
    }
    with torch.no_grad():
        text_alone = unet(**text_row).sample
        install_identity_processors(unet, identity_dim=TEXT_DIM)
        identity = torch.randn(1, 5, TEXT_DIM)
        for mode, adain_kind in (("mixed", "mean"), ("mutual", None), ("mixed", "full")):
            kwargs = {"identity": identity, "mode": mode, "adain": adain_kind}
            out = unet(**inputs, cross_attention_kwargs=kwargs).sample
            torch.testing.assert_close(out[1:], text_alone, atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_is_exact_and_drives_the_unet(tmp_path):
    unet = tiny_sdxl_unet()
    torch.manual_seed(7)
    adapter = InfiniteIdAdapter.for_unet(unet, **TINY_ENCODER)
    adapter.save_pretrained(tmp_path)
    loaded = InfiniteIdAdapter.from_pretrained(tmp_path)
    assert loaded.config.cross_attention_layers == adapter.config.cross_attention_layers
    assert loaded.state_dict().keys() == adapter.state_dict().keys()
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    clip, arcface = torch.randn(1, 257, 24), torch.randn(1, 16)
    loaded.attach(unet)
    with torch.no_grad():
        identity = loaded(clip, arcface)
        torch.testing.assert_close(identity, adapter(clip, arcface), atol=0, rtol=0)
        out = unet(**unet_inputs(1), cross_attention_kwargs={"identity": identity}).sample
        adapter.attach(unet)
        again = unet(**unet_inputs(1), cross_attention_kwargs={"identity": identity}).sample
    assert torch.equal(out, again)


def test_adapter_load_names_a_missing_key(tmp_path):
    adapter = InfiniteIdAdapter.for_unet(tiny_sdxl_unet(), **TINY_ENCODER)
    adapter.save_pretrained(tmp_path)
    state = load_file(tmp_path / ADAPTER_WEIGHTS)
    dropped = next(key for key in state if key.startswith("identity_kv.") and key.endswith("to_v_id.weight"))
    del state[dropped]
    state["identity_kv.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match="missing keys") as error:
        InfiniteIdAdapter.from_pretrained(tmp_path)
    assert dropped in str(error.value) and "identity_kv.extra.weight" in str(error.value)


def test_adapter_refuses_a_unet_with_other_layers():
    adapter = InfiniteIdAdapter(cross_attention_layers={"mid_block_attn2": 64}, encoder_config=TINY_ENCODER)
    with pytest.raises(ValueError, match="missing"):
        adapter.attach(tiny_sdxl_unet())
