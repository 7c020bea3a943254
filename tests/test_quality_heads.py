"""Embedding heads: the real LAION aesthetic checkpoint, the NSFW head's format, seeded tiny variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from infu.quality.aesthetic import LAION_AESTHETIC_DIM, AestheticHead
from infu.quality.nsfw import LAION_NSFW_DIM, NsfwHead
from infu.quality.torch_utils import save_weights

LAION_AESTHETIC_SHAPES = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}
LAION_NSFW_SHAPES = {
    "norm.mean": (768,),
    "norm.variance": (768,),
    "linear_1.weight": (64, 768),
    "linear_1.bias": (64,),
    "linear_2.weight": (512, 64),
    "linear_2.bias": (512,),
    "linear_3.weight": (256, 512),
    "linear_3.bias": (256,),
    "linear_4.weight": (1, 256),
    "linear_4.bias": (1,),
}


def _unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def laion_aesthetic_path(shared_models: Path) -> Path:
    path = shared_models / "laion-aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def test_real_laion_aesthetic_checkpoint_loads_strictly_and_scores_a_unit_vector(laion_aesthetic_path: Path):
    head = AestheticHead.from_checkpoint(laion_aesthetic_path)
    assert head.input_dim == LAION_AESTHETIC_DIM
    assert _shapes(head) == LAION_AESTHETIC_SHAPES
    score = head.score(_unit_rows(1, LAION_AESTHETIC_DIM))
    assert score.shape == (1,) and score.dtype == np.float32
    assert np.isfinite(score).all() and -5 < score[0] < 15


def test_real_aesthetic_head_is_deterministic_in_eval_mode(laion_aesthetic_path: Path):
    head = AestheticHead.from_checkpoint(laion_aesthetic_path)
    embeddings = _unit_rows(4, LAION_AESTHETIC_DIM)
    np.testing.assert_array_equal(head.score(embeddings), head.score(embeddings))


def test_aesthetic_head_is_affine_as_laion_trained_it():
    """No activations between the layers: the score of a mix is the mix of the scores."""
    head = AestheticHead.tiny(16, seed=3)
    first, second = _unit_rows(2, 16)
    mixed = head.score(np.stack([0.3 * first + 0.7 * second]))[0]
    expected = 0.3 * head.score(first[None])[0] + 0.7 * head.score(second[None])[0]
    assert mixed == pytest.approx(expected, abs=1e-5)


def test_a_checkpoint_of_another_architecture_is_rejected_naming_the_file(tmp_path: Path):
    path = save_weights(NsfwHead.tiny(16), tmp_path / "nsfw.pth")
    with pytest.raises(ValueError, match="nsfw.pth"):
        AestheticHead.from_checkpoint(path)


def test_nsfw_head_has_laions_torch_port_key_names_and_shapes():
    assert _shapes(NsfwHead(LAION_NSFW_DIM)) == LAION_NSFW_SHAPES


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_nsfw_head_round_trips_through_a_state_dict_file(tmp_path: Path, suffix: str):
    head = NsfwHead.tiny(24, seed=5)
    with torch.no_grad():
        head.norm.mean.uniform_(-0.1, 0.1)
        head.norm.variance.uniform_(0.01, 0.05)
    loaded = NsfwHead.from_checkpoint(save_weights(head, tmp_path / f"nsfw{suffix}"))
    embeddings = _unit_rows(5, 24)
    assert loaded.input_dim == 24
    np.testing.assert_array_equal(loaded.score(embeddings), head.score(embeddings))


def test_nsfw_scores_are_probabilities_and_depend_on_the_stored_statistics():
    head = NsfwHead.tiny(24, seed=1)
    embeddings = _unit_rows(16, 24)
    before = head.score(embeddings)
    assert before.shape == (16,) and ((before >= 0) & (before <= 1)).all()
    with torch.no_grad():
        head.norm.variance.fill_(1e-4)
    assert not np.allclose(head.score(embeddings), before)


def test_tiny_heads_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first, again, other = NsfwHead.tiny(8, seed=7), NsfwHead.tiny(8, seed=7), NsfwHead.tiny(8, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.linear_1.weight, again.linear_1.weight)
    assert not torch.equal(first.linear_1.weight, other.linear_1.weight)
    assert torch.equal(AestheticHead.tiny(8, 2).layers[0].weight, AestheticHead.tiny(8, 2).layers[0].weight)
