"""MINE on correlated Gaussians with known MI, and the MIMIC layer weights."""

import math

import pytest
import torch
from conftest import caller_draws, queued_cuda_seed, seed_caller

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


def test_derangement_leaves_no_index_in_place():
    from purify_fast.defenses.mine import derangement

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 17):
        for _ in range(200):
            d = derangement(n, g)
            assert sorted(d.tolist()) == list(range(n))
            assert not bool((d == torch.arange(n)).any()), d
    assert {tuple(derangement(3, g).tolist()) for _ in range(50)} == {(1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_no_marginal_pair_is_a_joint_pair(monkeypatch, batch_size):
    """A marginal sample must pair x_i with another example's z. A randperm shuffle of the
    batch leaves about one index in place per draw (half the steps at batch 2), and pairs an
    example drawn twice with its own z: such "marginal" pairs were joint pairs and biased the
    estimate low
    (true MI 1.66 nats: 0.73 at batch 2, 1.17 at batch 8). Every call the statistics network
    gets is recorded: each marginal call (the x of the joint call before it) differs from that
    joint call in the z of every row, in training and in the held-out estimate."""
    from purify_fast.defenses.mine import StatisticsNetwork

    calls = []
    real_forward = StatisticsNetwork.forward

    def recording(self, x, z):
        calls.append((x.detach().clone(), z.detach().clone()))
        return real_forward(self, x, z)

    monkeypatch.setattr(StatisticsNetwork, "forward", recording)
    x, z = _gaussians(0.9, 2, 200, seed=3)
    MINE(steps=60, hidden=16, batch_size=batch_size, eval_shuffles=4).estimate(x, z)
    joint, marginals = None, 0
    for xb, zb in calls:
        if joint is not None and torch.equal(xb, joint[0]):
            marginals += 1
            assert bool((zb != joint[1]).any(-1).all()), "a marginal row kept its own z"
        else:
            joint = (xb, zb)
    assert marginals == 60 + 4


def test_estimate_leaves_the_callers_global_rng_streams_alone():
    """MINE draws its init, split and batches from its own seed (a private generator, the init
    under a seeded torch stream put back afterwards): the caller's later draws are those it would
    have made without the call, and the estimate does not depend on the caller's seed."""
    from purify_fast.defenses.mine import estimate_layer_mi

    x, z = _gaussians(0.8, 2, 64, seed=7)
    mine = MINE(steps=20, hidden=16, batch_size=32, seed=3)
    ests = []
    for caller_seed in (5, 6):
        seed_caller(caller_seed)
        expected = caller_draws()
        seed_caller(caller_seed)
        ests.append((mine.estimate(x, z), estimate_layer_mi([x, z], z, mine)))
        assert caller_draws() == expected
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            # and the CUDA seed torch queued for when CUDA starts (fork_rng did not keep it)
            assert queued_cuda_seed() == caller_seed
    assert ests[0][0] == ests[1][0] and ests[0][1] == ests[1][1]  # MIEstimate compares by value
    assert ests[0][1][0] == ests[0][0]  # one layer's estimate is the plain estimate
