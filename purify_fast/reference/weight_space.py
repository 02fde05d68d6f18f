"""Reference implementations of the weight-space ops (Fine-mixing, E-PUR, Fine-purifying).

Every compiled backend must reproduce these exactly (masks, histograms) or to float tolerance
(scores, norms). Inputs here are flat, contiguous tensors of equal shape unless said otherwise;
``purify_fast.ops`` validates and flattens before calling any backend.

Shared definitions
------------------
Random mask (Philox4x32-10, Salmon et al. 2011). For element ``i`` of a tensor keyed by
``(seed, key)``::

    k0 = seed & 0xFFFFFFFF, k1 = key_hash(key)            # FNV-1a 32 of the UTF-8 key
    (c0, c1, c2, c3) = (i & 0xFFFFFFFF, i >> 32, 0, 0)
    u = philox4x32_10(counter, (k0, k1))[0]               # first output word, uint32
    keep_i = u < T,   T = philox_keep_threshold(rho) = round(rho * 2**32)   (0 <= T <= 2**32)

so keep_i ~ Bernoulli(rho) independently, and every backend draws the very same mask.

Scores (``indicator`` code in parentheses), computed in fp32 from fp32-cast inputs::

    d = ft - pre
    drift_over_hessian (0): d*d / (H + eps)
    drift              (1): |d|
    inv_hessian        (2): 1 / (H + eps)
    product            (3): (d*d) * H

All scores are >= 0, so the uint32 bit pattern of a score orders like its value. That lets a
global top-k threshold be found by a two-level radix select without ever storing the scores:
level 1 counts the high 16 bits (65536 bins); level 2 counts the low 16 bits of the elements whose
high 16 bits equal a chosen ``prefix``.
"""

from __future__ import annotations

import torch

INDICATORS = {"drift_over_hessian": 0, "drift": 1, "inv_hessian": 2, "product": 3}
NUM_BINS = 1 << 16
_M32 = 0xFFFFFFFF

# Philox4x32 round multipliers and Weyl key increments.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def key_hash(key: str) -> int:
    """FNV-1a 32-bit hash of a tensor key (e.g. its parameter name): the second Philox key word."""
    h = 0x811C9DC5
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & _M32
    return h


def philox_keep_threshold(rho: float) -> int:
    """Integer T with keep = (u < T) for a uint32 draw u: P(keep) = T / 2**32 ~= rho."""
    return int(round(float(rho) * 2.0**32))


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a*b, for a constant a and uint32 values b held
    in int64. Split a into 16-bit halves so no intermediate leaves int64's range."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo                      # < 2**48
    p_hi = b * a_hi                      # < 2**48
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    hi = ((p_hi + (p_lo >> 16)) >> 16) & _M32
    return hi, lo


def philox_uint32(index: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """First output word of Philox4x32-10 at counters (index_lo, index_hi, 0, 0), as int64."""
    index = index.to(torch.int64)
    c0, c1 = index & _M32, (index >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for rnd in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if rnd < 9:
            k0, k1 = (k0 + PHILOX_W0) & _M32, (k1 + PHILOX_W1) & _M32
    return c0


def mix_random(pre: torch.Tensor, ft: torch.Tensor, seed: int, key_word: int,
               keep_threshold: int, offset: int = 0) -> torch.Tensor:
    """``pre + m*(ft - pre)`` with the Philox mask m, written as a select (exact for m in {0,1}).
    ``offset``: the flat index of ``pre``'s first element in its tensor (for a chunk of it)."""
    index = torch.arange(offset, offset + pre.numel(), device=pre.device,
                         dtype=torch.int64).view(pre.shape)
    keep = philox_uint32(index, seed & _M32, key_word) < keep_threshold
    return torch.where(keep, ft, pre)


def fisher_accumulate_(acc: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``acc += scale * grad**2`` in place, the square taken in fp32 (acc is fp32)."""
    g = grad.to(torch.float32)
    acc.add_(g * g * scale)
    return acc


def scores(pre: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor | None,
           indicator: int, eps: float) -> torch.Tensor:
    """Per-coordinate suspicion score in fp32 (see the module docstring)."""
    d = ft.to(torch.float32) - pre.to(torch.float32)
    eps32 = torch.tensor(eps, dtype=torch.float32, device=d.device)
    if indicator == 0:
        return (d * d) / (hessian.to(torch.float32) + eps32)
    if indicator == 1:
        return d.abs()
    if indicator == 2:
        return 1.0 / (hessian.to(torch.float32) + eps32)
    if indicator == 3:
        return (d * d) * hessian.to(torch.float32)
    raise ValueError(f"unknown indicator code {indicator}")


def score_histogram(pre: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor | None,
                    indicator: int, eps: float, hist: torch.Tensor, prefix: int) -> torch.Tensor:
    """Add counts of score bit patterns into ``hist`` (int64, 65536 bins) in place.

    ``prefix < 0``: bin = high 16 bits of the score's fp32 bit pattern (level 1).
    ``prefix >= 0``: only scores whose high 16 bits equal ``prefix`` count, bin = low 16 bits.
    """
    bits = scores(pre, ft, hessian, indicator, eps).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    if prefix < 0:
        bins = bits >> 16
    else:
        bins = (bits & 0xFFFF)[(bits >> 16) == prefix]
    hist += torch.bincount(bins.flatten(), minlength=NUM_BINS).to(hist.device)
    return hist


def select_by_score(pre: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor | None,
                    indicator: int, eps: float, threshold: float,
                    selected_takes_finetuned: bool) -> torch.Tensor:
    """Coordinates with ``score >= threshold`` are *selected*.

    ``selected_takes_finetuned=False`` (Fine-purifying reset): selected -> pre, others -> ft.
    ``selected_takes_finetuned=True`` (magnitude mixing keep): selected -> ft, others -> pre.
    """
    s = scores(pre, ft, hessian, indicator, eps)
    sel = s >= torch.tensor(threshold, dtype=torch.float32, device=s.device)
    return torch.where(sel, ft, pre) if selected_takes_finetuned else torch.where(sel, pre, ft)


def embedding_drift_scores(pre: torch.Tensor, ft: torch.Tensor, freqs: torch.Tensor,
                           c: float) -> torch.Tensor:
    """E-PUR row scores: ``||ft[i] - pre[i]||_2 / log(max(f_i, c))`` in fp32, for [V, D] inputs
    and fp32 frequencies [V]."""
    d = ft.to(torch.float32) - pre.to(torch.float32)
    norms = torch.sqrt((d * d).sum(dim=1))
    return norms / torch.log(torch.clamp(freqs.to(torch.float32), min=float(c)))
