"""MINE (Belghazi et al., ICML 2018): mutual information estimated by a statistics network, used by
MIMIC to weight the layers of its attention loss.

For paired samples ``(x_i, z_i)`` of a joint distribution, a network ``T(x, z)`` gives the
Donsker–Varadhan lower bound::

    I(X; Z) ≥ E_joint[T(x, z)] − log E_marg[exp T(x, z')]

where the marginal samples pair each ``x_i`` with the ``z`` of another example (in training
one drawn uniformly from the others; on the held-out pairs a shuffle by a derangement,
:func:`derangement`), so no marginal pair is a joint pair.
Training maximises the bound; the gradient of ``log E_marg`` is bias-corrected with a moving average
of ``E_marg[exp T]`` (MINE §3.2), which is what keeps mini-batch training stable. The reported
estimate is the bound on held-out pairs (averaged over several shuffles), so a network that
memorised its training pairs cannot inflate it.

In MIMIC, ``x = pool(h_l)`` (a layer's features pooled over positions) and ``z`` is the encoder's
final feature; the per-layer estimates become weights ``w_l = a + b · MI_l / Σ_j MI_j``
(:func:`layer_weights`; a = 1000, b = 10000 as in the official code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from purify_fast.training import rng_preserved
from purify_fast.validation import int_at_least, real_in
from torch import nn


# The fewest paired samples an estimate takes (a held-out part of 4 and pairs to train on).
MIN_SAMPLES = 8


class StatisticsNetwork(nn.Module):
    """``T(x, z)``: an MLP on ``[x; z]`` returning one score per pair (``[B]``)."""

    def __init__(self, x_dim: int, z_dim: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        for name, v in (("x_dim", x_dim), ("z_dim", z_dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        dims = [x_dim + z_dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ELU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)
        self.x_dim, self.z_dim = x_dim, z_dim

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, z], dim=-1)).squeeze(-1)


def dv_bound(t_joint: torch.Tensor, t_marg: torch.Tensor) -> torch.Tensor:
    """Donsker–Varadhan bound ``mean(t_joint) − log mean(exp t_marg)`` (log-sum-exp, stable)."""
    return t_joint.mean() - (torch.logsumexp(t_marg, dim=0) - math.log(t_marg.numel()))


def _check_pairs(x, z) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor [samples, features], got "
                             f"{t.dtype} {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN/Inf")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but z has {z.shape[0]}")
    if x.shape[0] < MIN_SAMPLES:
        raise ValueError(f"MINE needs at least {MIN_SAMPLES} paired samples, got {x.shape[0]}")
    return x.float(), z.float()


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (``n >= 2``): a random order
    ``p`` of the indices, each sent to the next one in that order (one cycle through all).

    A plain ``randperm`` leaves about one index in place per draw: that "marginal" pair is a
    joint pair and biases the DV bound low, most at small batches (half the draws at 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    p = torch.randperm(n, generator=generator)
    out = torch.empty_like(p)
    out[p] = p.roll(-1)
    return out


def _standardise(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Layer features differ in scale by orders of magnitude across layers; per-feature z-scores
    # let one learning rate fit every layer. MI is invariant to this invertible map.
    return (t - ref.mean(0)) / ref.std(0).clamp_min(1e-6)


@dataclass
class MIEstimate:
    """A held-out DV estimate (nats) and the training curve (bound per logged step)."""

    mi: float
    curve: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class MINE:
    """Estimate ``I(X; Z)`` from paired samples.

    ``steps`` optimiser steps of Adam(``lr``) on batches of ``batch_size``, EMA rate ``ema`` for
    the bias-corrected gradient; ``holdout`` share of pairs kept out of training for the final
    estimate (averaged over ``eval_shuffles`` shuffles); ``seed`` fixes the network init, the
    split and the batches (drawn from streams of its own: the caller's global RNG states are
    left as they were).
    """

    hidden: int = 256
    depth: int = 2
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    ema: float = 0.01
    holdout: float = 0.25
    eval_shuffles: int = 8
    seed: int = 0
    log_every: int = 10
    device: str | torch.device | None = None

    def __post_init__(self):
        int_at_least("steps", self.steps, 1)
        int_at_least("batch_size", self.batch_size, 2)
        real_in("holdout", self.holdout, 0.0, 1.0, lo_open=True, hi_open=True)
        real_in("ema", self.ema, 0.0, 1.0, lo_open=True)
        real_in("lr", self.lr, 0.0, lo_open=True)
        for name in ("hidden", "depth", "eval_shuffles", "log_every"):
            int_at_least(name, getattr(self, name), 1)

    def estimate(self, x: torch.Tensor, z: torch.Tensor) -> MIEstimate:
        """Train a fresh statistics network on ``(x, z)`` and return the held-out estimate."""
        x, z = _check_pairs(x, z)
        device = torch.device(self.device) if self.device is not None else x.device
        gen = torch.Generator().manual_seed(int(self.seed))
        n = x.shape[0]
        perm = torch.randperm(n, generator=gen)
        n_eval = max(4, int(round(self.holdout * n)))
        if n - n_eval < 2:  # the statistics network needs pairs to train on, and their shuffles
            raise ValueError(f"{n} samples with holdout {self.holdout}: {n_eval} are held out for "
                             f"the estimate and {n - n_eval} left to train on; at least 2 are "
                             f"needed (more samples or a smaller holdout)")
        ev, tr = perm[:n_eval], perm[n_eval:]
        xs, zs = _standardise(x, x[tr]).to(device), _standardise(z, z[tr]).to(device)
        x_tr, z_tr, x_ev, z_ev = xs[tr.to(device)], zs[tr.to(device)], xs[ev.to(device)], zs[ev.to(device)]

        with rng_preserved():  # seeded without touching the caller's streams (a queued CUDA seed too)
            torch.manual_seed(int(self.seed))
            net = StatisticsNetwork(x.shape[1], z.shape[1], self.hidden, self.depth).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.lr))
        bs = min(self.batch_size, x_tr.shape[0])
        log_ma = None
        curve, steps = [], []
        for step in range(1, self.steps + 1):
            # The joint pairs: a batch drawn with replacement (drawn without, a batch as large
            # as the training part was the same every step and the network learnt those pairs:
            # held-out estimates fell below 0 on MiniLM features). The marginal pairs each x with
            # the z of another example, drawn uniformly: a shuffle of the batch paired an example
            # drawn twice with its own z, a joint pair that biased the bound low.
            n_tr = x_tr.shape[0]
            idx = torch.randint(0, n_tr, (bs,), generator=gen)
            other = (idx + torch.randint(1, n_tr, (bs,), generator=gen)) % n_tr
            idx, other = idx.to(device), other.to(device)
            t_joint = net(x_tr[idx], z_tr[idx])
            t_marg = net(x_tr[idx], z_tr[other])
            # The moving average of E_marg[e^T] is kept in log space so it never overflows.
            log_e = torch.logsumexp(t_marg, dim=0) - math.log(bs)
            cur = log_e.detach()
            log_ma = cur if log_ma is None else torch.logaddexp(
                log_ma + math.log1p(-self.ema), cur + math.log(self.ema))
            # ∇ of exp(log_e − log_ma) = ∇E[e^T] / MA(E[e^T]): the bias-corrected MINE gradient.
            loss = -(t_joint.mean() - torch.exp(log_e - log_ma))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % self.log_every == 0 or step == self.steps:
                curve.append(float(dv_bound(t_joint.detach(), t_marg.detach())))
                steps.append(step)
        return MIEstimate(self._heldout(net, x_ev, z_ev, gen), curve, steps)

    @torch.no_grad()
    def _heldout(self, net: StatisticsNetwork, x: torch.Tensor, z: torch.Tensor,
                 gen: torch.Generator) -> float:
        net.eval()
        t_joint = net(x, z)
        t_marg = torch.cat([net(x, z[derangement(x.shape[0], gen).to(x.device)])
                            for _ in range(self.eval_shuffles)])
        return float(dv_bound(t_joint, t_marg))


def estimate_layer_mi(pooled: Sequence[torch.Tensor], final: torch.Tensor,
                      mine: MINE | None = None) -> list[MIEstimate]:
    """``I(pool(h_l); z)`` for every layer: ``pooled[l]`` is ``[samples, d_l]``, ``final`` is
    ``[samples, d_z]``. Each layer gets its own statistics network (same settings)."""
    mine = mine or MINE()
    if not len(pooled):
        raise ValueError("pooled is empty: pass at least one layer's pooled features")
    return [mine.estimate(h, final) for h in pooled]


def layer_weights(mi: Sequence[float], a: float = 1000.0, b: float = 10000.0) -> list[float]:
    """``w_l = a + b · MI_l / Σ_j MI_j`` (MIMIC). Negative estimates (a DV bound below zero is
    estimation noise: MI ≥ 0) count as 0; with no positive estimate every layer gets ``a``."""
    vals = [float(v) for v in mi]
    if not vals:
        raise ValueError("mi is empty")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mi estimates must be finite, got {vals}")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"a and b must be finite, got a={a!r}, b={b!r}")
    vals = [max(v, 0.0) for v in vals]
    total = sum(vals)
    if total <= 0:
        return [float(a)] * len(vals)
    return [float(a) + float(b) * v / total for v in vals]


def gaussian_mi(rho: float, dim: int) -> float:
    """Closed form ``I = −½ · dim · log(1 − ρ²)`` for ``dim`` independent pairs of unit Gaussians
    with correlation ``rho`` (the synthetic check of the estimator)."""
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    return -0.5 * dim * math.log(1.0 - rho * rho)
