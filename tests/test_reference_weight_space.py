"""The weight-space reference itself: Philox against published answers, the Bernoulli mask's
statistics, the radix histograms against a sort, and the fp32 math against fp64.

Every backend is tested against this reference (tests/test_ops_weight_space.py), so the reference
is checked here against truths computed another way.
"""

from __future__ import annotations

import math

import pytest
import torch

from purify_fast.reference import weight_space as ref

M32 = 0xFFFFFFFF


def philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Plain-integer Philox4x32-10 with all four counter words, written from the Random123 paper's
    description, independent of the reference's tensor implementation."""
    c = list(ctr)
    k0, k1 = key
    for rnd in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        if rnd < 9:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return tuple(c)


# Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): counter, key, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_general_philox_helper_matches_random123(ctr, key, expected):
    assert philox4x32_10(ctr, key) == expected


def test_reference_philox_known_answer():
    word = ref.philox_uint32(torch.tensor([0]), 0, 0)
    assert int(word[0]) == 0x6627E8D5


def test_reference_philox_matches_general_helper_on_wide_counters_and_keys():
    gen = torch.Generator().manual_seed(1)
    index = torch.cat([
        torch.tensor([0, 1, M32, M32 + 1, 2**40 + 7, 2**62 + 3, 2**63 - 1]),
        torch.randint(0, 2**62, (25,), generator=gen),
    ])
    for k0, k1 in [(0, 0), (M32, M32), (0x12345678, 0x9ABCDEF0), (1, 2**31)]:
        words = ref.philox_uint32(index, k0, k1)
        for i, w in zip(index.tolist(), words.tolist()):
            assert w == philox4x32_10((i & M32, i >> 32, 0, 0), (k0, k1))[0], (i, k0, k1)


@pytest.mark.parametrize("text,expected", [("", 0x811C9DC5), ("a", 0xE40C292C),
                                           ("foobar", 0xBF9CF968)])
def test_key_hash_is_fnv1a_32(text, expected):
    assert ref.key_hash(text) == expected


def test_key_hash_of_utf8_and_parameter_names_differ():
    names = ["bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.0.attention.self.key.weight", "embeddings.wörter", ""]
    hashes = [ref.key_hash(n) for n in names]
    assert len(set(hashes)) == len(hashes)
    assert all(0 <= h <= M32 for h in hashes)


@pytest.mark.parametrize("rho,expected", [(0.0, 0), (1.0, 2**32), (0.5, 2**31), (0.25, 2**30),
                                          (1e-12, 0)])
def test_keep_threshold(rho, expected):
    assert ref.philox_keep_threshold(rho) == expected


def _keep(n: int, seed: int, key: str, rho: float) -> torch.Tensor:
    index = torch.arange(n, dtype=torch.int64)
    return ref.philox_uint32(index, seed, ref.key_hash(key)) < ref.philox_keep_threshold(rho)


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_bernoulli_keep_rate_within_binomial_bounds(rho):
    n = 200_000
    kept = int(_keep(n, seed=1234, key="layer.weight", rho=rho).sum())
    sigma = math.sqrt(n * rho * (1 - rho))
    # 5 sigma: a false alarm has probability ~6e-7 per case.
    assert abs(kept - n * rho) <= 5 * sigma, (kept, n * rho, sigma)


def test_mask_words_are_uniform_and_adjacent_indices_uncorrelated():
    n = 1 << 17
    u = ref.philox_uint32(torch.arange(n), 7, ref.key_hash("w")).to(torch.float64) / 2.0**32
    # Chi-square over 64 equal buckets, 63 degrees of freedom: the 1e-6 tail starts near 130.
    counts = torch.bincount((u * 64).long(), minlength=64).to(torch.float64)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 130, chi2
    # Neighbouring elements of a tensor must not share their fate: correlation ~ N(0, 1/sqrt(n)).
    a, b = u[:-1] - 0.5, u[1:] - 0.5
    corr = float((a * b).mean() / (a.std() * b.std()))
    assert abs(corr) < 5 / math.sqrt(n), corr


@pytest.mark.parametrize("other", [{"seed": 1235, "key": "layer.weight"},
                                   {"seed": 1234, "key": "layer.bias"},
                                   {"seed": 1234 + 2**31, "key": "layer.weight"}])
def test_different_seeds_or_keys_give_independent_masks(other):
    n, rho = 100_000, 0.5
    base = _keep(n, seed=1234, key="layer.weight", rho=rho)
    alt = _keep(n, rho=rho, **other)
    agree = int((base == alt).sum())
    # Independent Bernoulli(1/2) masks agree on half the elements, within 5 sigma.
    assert abs(agree - n / 2) <= 5 * math.sqrt(n / 4), agree
    assert torch.equal(base, _keep(n, seed=1234, key="layer.weight", rho=rho))


def test_mix_random_rho_edges_and_select_semantics():
    gen = torch.Generator().manual_seed(0)
    pre, ft = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    none = ref.mix_random(pre, ft, 5, ref.key_hash("x"), ref.philox_keep_threshold(0.0))
    every = ref.mix_random(pre, ft, 5, ref.key_hash("x"), ref.philox_keep_threshold(1.0))
    assert torch.equal(none, pre)
    assert torch.equal(every, ft)
    half = ref.mix_random(pre, ft, 5, ref.key_hash("x"), ref.philox_keep_threshold(0.5))
    from_ft, from_pre = half == ft, half == pre
    assert bool((from_ft | from_pre).all())
    assert 0 < int(from_ft.sum()) < 1000


# --------------------------------------------------------------------------- scores, histograms

def _inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, generator=gen)
    ft = pre + 0.1 * torch.randn(n, generator=gen)
    hess = torch.rand(n, generator=gen) * 1e-2 + 1e-6
    return pre, ft, hess


def _scores64(pre, ft, hess, indicator: int, eps: float) -> torch.Tensor:
    d = ft.double() - pre.double()
    h = None if hess is None else hess.double()
    return {0: lambda: d * d / (h + eps), 1: lambda: d.abs(), 2: lambda: 1.0 / (h + eps),
            3: lambda: d * d * h}[indicator]()


@pytest.mark.parametrize("indicator", [0, 1, 2, 3])
def test_scores_match_fp64_within_fp32_rounding(indicator):
    pre, ft, hess = _inputs(5000)
    s32 = ref.scores(pre, ft, hess, indicator, 1e-8)
    s64 = _scores64(pre, ft, hess, indicator, 1e-8)
    assert s32.dtype == torch.float32
    assert bool((s32 >= 0).all())
    # Each op rounds once in fp32 (eps itself rounded to fp32): a few ulps of relative error.
    rel = ((s32.double() - s64).abs() / s64.abs().clamp_min(1e-30)).max()
    assert float(rel) < 4 * 2.0**-23, float(rel)


def test_scores_reject_unknown_indicator():
    pre, ft, hess = _inputs(10)
    with pytest.raises(ValueError, match="unknown indicator code 7"):
        ref.scores(pre, ft, hess, 7, 1e-8)


@pytest.mark.parametrize("indicator", [0, 1, 3])
def test_level1_histogram_equals_sort_based_bin_counts(indicator):
    pre, ft, hess = _inputs(20_000, seed=indicator)
    hist = torch.zeros(ref.NUM_BINS, dtype=torch.int64)
    ref.score_histogram(pre, ft, hess, indicator, 1e-8, hist, -1)
    assert int(hist.sum()) == pre.numel()
    # Truth by value, not by bits: sort the scores and count those inside each bin's value range
    # [float(b << 16), float((b + 1) << 16)).
    s = torch.sort(ref.scores(pre, ft, hess, indicator, 1e-8)).values
    nonzero = torch.nonzero(hist).flatten()
    edges = torch.stack([nonzero, nonzero + 1]).to(torch.int32) << 16
    lo, hi = edges.view(torch.float32)
    truth = torch.searchsorted(s, hi, right=False) - torch.searchsorted(s, lo, right=False)
    assert torch.equal(hist[nonzero], truth)


def test_level2_histogram_counts_exact_values_of_one_prefix():
    pre, ft, hess = _inputs(20_000, seed=3)
    s = ref.scores(pre, ft, hess, 0, 1e-8)
    bits = s.view(torch.int32).to(torch.int64)
    prefix = int(torch.mode(bits >> 16).values)
    hist = torch.zeros(ref.NUM_BINS, dtype=torch.int64)
    ref.score_histogram(pre, ft, hess, 0, 1e-8, hist, prefix)
    in_prefix = s[(bits >> 16) == prefix]
    assert int(hist.sum()) == in_prefix.numel() > 1
    values, counts = torch.unique(in_prefix, return_counts=True)
    low_bits = values.view(torch.int32).to(torch.int64) & 0xFFFF
    assert torch.equal(hist[low_bits], counts)
    assert int(hist.sum()) == int(counts.sum())


def test_histogram_accumulates_into_existing_counts():
    pre, ft, hess = _inputs(3000)
    once = torch.zeros(ref.NUM_BINS, dtype=torch.int64)
    ref.score_histogram(pre, ft, hess, 0, 1e-8, once, -1)
    twice = once.clone()
    ref.score_histogram(pre, ft, hess, 0, 1e-8, twice, -1)
    assert torch.equal(twice, 2 * once)


@pytest.mark.parametrize("takes_ft", [False, True])
def test_select_by_score_takes_exactly_the_sorted_top_k(takes_ft):
    pre, ft, hess = _inputs(4099, seed=9)
    s = ref.scores(pre, ft, hess, 0, 1e-8)
    assert torch.unique(s).numel() == s.numel()  # no ties in this draw: top-k is one set
    k = 411
    kth = float(torch.sort(s, descending=True).values[k - 1])
    out = ref.select_by_score(pre, ft, hess, 0, 1e-8, kth, takes_ft)
    top = torch.zeros_like(s, dtype=torch.bool)
    top[torch.topk(s, k).indices] = True
    assert torch.equal(out, torch.where(top == takes_ft, ft, pre))


def test_fisher_accumulate_matches_fp64():
    gen = torch.Generator().manual_seed(4)
    acc = torch.rand(4099, generator=gen)
    grad = torch.randn(4099, generator=gen).to(torch.bfloat16)
    truth = acc.double() + 0.37 * grad.double() ** 2
    out = ref.fisher_accumulate_(acc, grad, 0.37)
    assert out is acc and out.dtype == torch.float32
    assert float(((out.double() - truth).abs() / truth).max()) < 3 * 2.0**-23


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_drift_scores_match_fp64(dtype):
    gen = torch.Generator().manual_seed(5)
    pre = torch.randn(37, 123, generator=gen).to(dtype)
    ft = (pre.float() + 0.05 * torch.randn(37, 123, generator=gen)).to(dtype)
    freqs = torch.randint(0, 5000, (37,), generator=gen).to(torch.float32)
    freqs[:3] = torch.tensor([0.0, 1.0, 19.0])
    d = ft.double() - pre.double()
    truth = d.pow(2).sum(1).sqrt() / torch.log(freqs.double().clamp_min(20.0))
    out = ref.embedding_drift_scores(pre, ft, freqs, 20.0)
    assert out.dtype == torch.float32 and out.shape == (37,)
    assert float(((out.double() - truth).abs() / truth).max()) < 1e-5
    # Rare tokens share the floor log(c): below c their score is the raw drift norm over log(20).
    rare = freqs < 20
    expect = d.pow(2).sum(1).sqrt()[rare] / math.log(20.0)
    torch.testing.assert_close(out[rare].double(), expect, rtol=1e-5, atol=0)
