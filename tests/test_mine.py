"""MINE on correlated Gaussians with known MI, and the MIMIC layer weights."""

import math

import pytest
import torch

from purify_fast.defenses.mine import MINE, dv_bound, gaussian_mi, layer_weights


def _gaussians(rho, dim, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    z = rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, dim, generator=g)
    return x, z


@pytest.mark.parametrize("rho, dim", [(0.7, 4), (0.5, 5)])
def test_estimate_within_20_percent_of_closed_form(rho, dim):
    x, z = _gaussians(rho, dim, 4000, seed=dim)
    est = MINE(steps=400, hidden=64, batch_size=512, lr=3e-3, seed=1).estimate(x, z)
    true = gaussian_mi(rho, dim)
    assert abs(est.mi - true) <= 0.2 * true, (est.mi, true)
    assert est.curve and est.steps[-1] == 400


def test_independent_variables_give_near_zero():
    x, _ = _gaussians(0.0, 3, 3000, seed=5)
    _, z = _gaussians(0.0, 3, 3000, seed=6)
    est = MINE(steps=200, hidden=64, batch_size=512, lr=3e-3).estimate(x, z)
    assert abs(est.mi) < 0.1


def test_dv_bound_of_constant_critic_is_zero():
    t = torch.full((10,), 3.0)
    assert abs(float(dv_bound(t, t))) < 1e-6


def test_layer_weights():
    assert layer_weights([1.0, 3.0]) == [1000 + 2500.0, 1000 + 7500.0]
    assert layer_weights([-0.2, 1.0], a=1, b=10) == [1.0, 11.0]
    assert layer_weights([0.0, -1.0]) == [1000.0, 1000.0]
    with pytest.raises(ValueError, match="finite"):
        layer_weights([float("nan")])
    with pytest.raises(ValueError, match="empty"):
        layer_weights([])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="x has 10 samples but z has 9"):
        MINE().estimate(torch.randn(10, 2), torch.randn(9, 2))
    with pytest.raises(ValueError, match="z must be a 2-D float tensor"):
        MINE().estimate(torch.randn(10, 2), torch.randn(10))
    with pytest.raises(ValueError, match="steps"):
        MINE(steps=0)
    with pytest.raises(ValueError, match="rho"):
        gaussian_mi(1.0, 2)
