"""Identity mixing: validated, renormalised weights; unit-length result."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infu.model.mixing import mix_identities, normalise_weights


def test_weights_are_validated_and_renormalised():
    assert normalise_weights([2, 6], 2) == [0.25, 0.75]
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([0, 3], 2) == [0.0, 1.0]
    for bad, message in (
        ([1.0], "1 mixing weights for 2"),
        ([1.0, -0.5], "non-negative"),
        ([1.0, math.nan], "finite"),
        ([0.0, 0.0], "all be zero"),
    ):
        with pytest.raises(ValueError, match=message):
            normalise_weights(bad, 2)
    with pytest.raises(ValueError, match="at least one"):
        normalise_weights(None, 0)


def test_mix_of_two_orthogonal_identities():
    a, b = np.array([3.0, 0.0, 0.0]), np.array([0.0, 0.5, 0.0])  # not unit: normalised first
    mixed = mix_identities([a, b], [1, 3])
    expected = torch.tensor([0.25, 0.75, 0.0]) / math.hypot(0.25, 0.75)
    torch.testing.assert_close(mixed, expected)
    assert mixed.dtype == torch.float32
    assert torch.linalg.vector_norm(mixed).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(mix_identities([a, b]), torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_single_identity_and_one_hot_weights_give_the_identity_back():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, generator=generator), torch.randn(128, generator=generator)
    torch.testing.assert_close(mix_identities([a]), a / a.norm())
    torch.testing.assert_close(mix_identities([a, b], [0, 1]), b / b.norm())


def test_mixing_rejects_degenerate_inputs():
    with pytest.raises(ValueError, match="differ in size"):
        mix_identities([np.ones(128), np.ones(512)])
    with pytest.raises(ValueError, match="identity embedding 1 has zero"):
        mix_identities([np.ones(4), np.zeros(4)])
    with pytest.raises(ValueError, match="cancel out"):
        mix_identities([np.ones(4), -np.ones(4)])
