"""Identity projection: released key layout, parameter count, forward math, released .bin loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from infu.model.config import ProjectionConfig
from infu.model.projection import (
    PROJECTION_BIN,
    PROJECTION_CONFIG,
    PROJECTION_SAFETENSORS,
    IdentityProjection,
)

FULL = ProjectionConfig()
SMALL = ProjectionConfig(
    dim=48, depth=2, dim_head=8, heads=3, num_queries=4, embedding_dim=128, output_dim=40
)


def reference_shapes(config: ProjectionConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape, transcribed from the table in infu-checkpoint-format.md."""
    dim, inner, hidden = config.dim, config.heads * config.dim_head, config.dim * config.ff_mult
    shapes = {
        "latents": (1, config.num_queries, dim),
        "proj_in.weight": (dim, config.embedding_dim),
        "proj_in.bias": (dim,),
        "proj_out.weight": (config.output_dim, dim),
        "proj_out.bias": (config.output_dim,),
        "norm_out.weight": (config.output_dim,),
        "norm_out.bias": (config.output_dim,),
    }
    for layer in range(config.depth):
        prefix = f"layers.{layer}"
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.0.{norm}.weight"] = (dim,)
            shapes[f"{prefix}.0.{norm}.bias"] = (dim,)
        shapes[f"{prefix}.0.to_q.weight"] = (inner, dim)
        shapes[f"{prefix}.0.to_kv.weight"] = (2 * inner, dim)
        shapes[f"{prefix}.0.to_out.weight"] = (dim, inner)
        shapes[f"{prefix}.1.0.weight"] = (dim,)
        shapes[f"{prefix}.1.0.bias"] = (dim,)
        shapes[f"{prefix}.1.1.weight"] = (hidden, dim)
        shapes[f"{prefix}.1.3.weight"] = (dim, hidden)
    return shapes


def reference_state_dict(config: ProjectionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * 0.2 for key, shape in reference_shapes(config).items()
    }


def reference_forward(state: dict[str, torch.Tensor], config: ProjectionConfig, embedding: torch.Tensor):
    """The spec's forward, written independently with plain functional ops."""

    def layer_norm(x, prefix):
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        )

    batch, heads, dim_head = embedding.shape[0], config.heads, config.dim_head
    x = embedding[:, None] @ state["proj_in.weight"].T + state["proj_in.bias"]
    latents = state["latents"].repeat(batch, 1, 1)
    for layer in range(config.depth):
        p = f"layers.{layer}"
        normed_x, normed_latents = layer_norm(x, f"{p}.0.norm1"), layer_norm(latents, f"{p}.0.norm2")
        q = normed_latents @ state[f"{p}.0.to_q.weight"].T
        kv = torch.cat([normed_x, normed_latents], dim=1) @ state[f"{p}.0.to_kv.weight"].T
        k, v = kv[..., : heads * dim_head], kv[..., heads * dim_head :]
        q, k, v = (t.reshape(batch, -1, heads, dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(dim_head))
        weights = torch.softmax((q * scale) @ (k * scale).transpose(-1, -2), dim=-1)
        attended = (weights @ v).permute(0, 2, 1, 3).reshape(batch, -1, heads * dim_head)
        latents = attended @ state[f"{p}.0.to_out.weight"].T + latents
        hidden = layer_norm(latents, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T
        latents = torch.nn.functional.gelu(hidden) @ state[f"{p}.1.3.weight"].T + latents
    out = latents @ state["proj_out.weight"].T + state["proj_out.bias"]
    return layer_norm(out, "norm_out")


def test_full_size_keys_shapes_and_parameter_count_on_meta():
    with torch.device("meta"):
        projection = IdentityProjection.from_projection_config(FULL)
    shapes = {key: tuple(tensor.shape) for key, tensor in projection.state_dict().items()}
    assert shapes == reference_shapes(FULL)
    count = sum(parameter.numel() for parameter in projection.parameters())
    print(f"\nidentity projection parameters (full size): {count:,}")
    assert count == 84_595_968


def test_forward_matches_the_spec_math_and_shapes():
    state = reference_state_dict(SMALL)
    projection = IdentityProjection.from_projection_config(SMALL)
    projection.load_state_dict(state, strict=True)
    embedding = torch.nn.functional.normalize(torch.randn(3, SMALL.embedding_dim), dim=-1)
    tokens = projection(embedding)
    assert tokens.shape == (3, SMALL.num_queries, SMALL.output_dim)
    torch.testing.assert_close(tokens, reference_forward(state, SMALL, embedding), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projection(embedding[:, None]), tokens)


def test_rejects_embeddings_of_another_face_backend():
    projection = IdentityProjection.from_projection_config(SMALL)
    with pytest.raises(ValueError, match="512-D but the projection expects 128-D"):
        projection(torch.randn(1, 512))


def test_loads_a_released_bin_strictly(tmp_path):
    state = reference_state_dict(SMALL, seed=1)
    torch.save({"image_proj": state}, tmp_path / PROJECTION_BIN)
    projection = IdentityProjection.from_pretrained(tmp_path, SMALL)
    for key, tensor in projection.state_dict().items():
        assert torch.equal(tensor, state[key])

    state.pop("layers.1.1.3.weight")
    torch.save({"image_proj": state}, tmp_path / PROJECTION_BIN)
    with pytest.raises(RuntimeError, match="Missing key"):
        IdentityProjection.from_pretrained(tmp_path, SMALL)


class _Payload:
    """Not a tensor: a weights_only load must refuse to unpickle it."""


def test_bin_is_read_with_weights_only(tmp_path):
    torch.save({"image_proj": reference_state_dict(SMALL), "extra": _Payload()}, tmp_path / PROJECTION_BIN)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        IdentityProjection.from_pretrained(tmp_path, SMALL)


def test_save_writes_safetensors_and_the_released_bin_and_reloads_without_a_config(tmp_path):
    projection = IdentityProjection.from_projection_config(SMALL)
    projection.save_pretrained(tmp_path)
    assert (tmp_path / PROJECTION_SAFETENSORS).is_file()
    released = torch.load(tmp_path / PROJECTION_BIN, weights_only=True)
    assert set(released) == {"image_proj"}
    assert set(released["image_proj"]) == set(reference_shapes(SMALL))
    reloaded = IdentityProjection.from_pretrained(tmp_path)
    assert reloaded.config.embedding_dim == SMALL.embedding_dim
    embedding = torch.randn(2, SMALL.embedding_dim)
    assert torch.equal(reloaded(embedding), projection(embedding))


def test_the_embedding_space_is_declared_saved_and_checked_on_load(tmp_path):
    assert (FULL.embedding_space, SMALL.embedding_space) == ("arcface_ir_se50", "dlib")
    with pytest.raises(ValueError, match="dlib embeddings are 128-D, but embedding_dim is 512"):
        ProjectionConfig(embedding_space="dlib")
    glintr100 = ProjectionConfig(
        **{**SMALL.model_dump(), "embedding_dim": 512, "embedding_space": "glintr100"}
    )
    arcface = ProjectionConfig(**{**glintr100.model_dump(), "embedding_space": "arcface_ir_se50"})
    IdentityProjection.from_projection_config(glintr100).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / PROJECTION_CONFIG).read_text())
    assert saved["embedding_space"] == "glintr100"
    assert IdentityProjection.from_pretrained(tmp_path).config.embedding_space == "glintr100"
    with pytest.raises(ValueError, match="expects glintr100 embeddings .*embedding_space is arcface_ir_se50"):
        IdentityProjection.from_pretrained(tmp_path, arcface)
    # a config without the key (written before spaces were declared): 512-D is taken as the release's
    (tmp_path / PROJECTION_CONFIG).write_text(
        json.dumps({k: v for k, v in saved.items() if k != "embedding_space"})
    )
    assert IdentityProjection.from_pretrained(tmp_path).config.embedding_space == "arcface_ir_se50"
    # the released form, without our config: trained on arcface_ir_se50
    (tmp_path / PROJECTION_CONFIG).unlink()
    assert IdentityProjection.from_pretrained(tmp_path, arcface).config.embedding_space == "arcface_ir_se50"
    with pytest.raises(ValueError, match="released checkpoint"):
        IdentityProjection.from_pretrained(tmp_path, glintr100)


def test_loads_a_full_size_released_bin_strictly(tmp_path):
    """A reference state dict of the released hyperparameters, one constant per key to check the mapping."""
    shapes = reference_shapes(FULL)
    torch.save(
        {
            "image_proj": {
                key: torch.full(shape, float(index)) for index, (key, shape) in enumerate(shapes.items())
            }
        },
        tmp_path / PROJECTION_BIN,
    )
    projection = IdentityProjection.from_pretrained(tmp_path)
    loaded = projection.state_dict()
    for index, key in enumerate(shapes):
        assert loaded[key].shape == shapes[key] and loaded[key].flatten()[0].item() == index
