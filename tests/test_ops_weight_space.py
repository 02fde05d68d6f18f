"""Every weight-space op on every backend that can run here, against the reference.

Backends come from ``purify_fast.backend.available(device)``: on CPU that is ``torch``, ``triton``
under the interpreter (conftest sets ``TRITON_INTERPRET=1`` when there is no GPU) and ``cpp`` once
the C++ extension is built; on a CUDA machine the same tests also run CUDA tensors through
``cuda`` and ``triton``. Masks, histograms and selections must match the reference bit for bit;
float results pass the three-way check
``|out - ref_fp64| <= 2 * |ref_same_dtype - ref_fp64| + atol(dtype)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, DTYPES

from purify_fast import backend as bk
from purify_fast import ops
from purify_fast.reference import weight_space as ref

CASES = [(dev, name) for dev in DEVICES for name in bk.available(dev)]
KERNEL_CASES = [(dev, name) for dev, name in CASES if name != "torch"]
SHAPES = [(5, 123), (1, 1), (3, 4099)]
LAYOUTS = ["contiguous", "transposed", "sliced"]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

_seed = iter(range(10**9))


def _gen() -> torch.Generator:
    # Fresh inputs for every call, reproducible from the test order.
    return torch.Generator().manual_seed(1000 + next(_seed))


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (2-D) held in a contiguous, column-major or every-other-column
    buffer."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        buf = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        buf[:, ::2] = t
        return buf[:, ::2]
    raise AssertionError(layout)


def make(shape, dtype, device, layout="contiguous", *, scale=1.0, base=None):
    """Fresh normal values of ``shape`` (plus ``base`` if given) in the requested memory layout."""
    t = torch.randn(shape, generator=_gen()) * scale
    if base is not None:
        t = base.float().cpu() + t
    t = relayout(t.to(dtype).to(device), layout)
    assert (layout == "contiguous") == t.is_contiguous() or t.numel() == 1
    return t


def triple(shape, dtype, device, layout="contiguous"):
    pre = make(shape, dtype, device, layout)
    ft = make(shape, dtype, device, layout, scale=0.05, base=pre)
    hess = (torch.rand(shape, generator=_gen()) * 1e-2 + 1e-5).to(device)
    return pre, ft, hess


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype]).cpu()


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = bits(a) != bits(b)
    assert not bool(diff.any()), f"{int(diff.sum())} of {a.numel()} elements differ"


def three_way(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, atol: float):
    out, ref_same, ref64 = out.cpu().double(), ref_same.cpu().double(), ref64.cpu().double()
    err = (out - ref64).abs()
    bound = 2 * (ref_same - ref64).abs() + atol
    bad = err > bound
    assert not bool(bad.any()), (f"{int(bad.sum())} elements outside the three-way bound; worst "
                                 f"excess {float((err - bound).max()):.3g}")


class Untouched:
    """Snapshot of inputs; ``check()`` asserts that no op wrote into them."""

    def __init__(self, *tensors):
        self.pairs = [(t, t.clone()) for t in tensors if t is not None]

    def check(self):
        for t, saved in self.pairs:
            assert t.dtype == saved.dtype and t.shape == saved.shape
            dense = (x.clone(memory_format=torch.contiguous_format).view(-1).view(torch.uint8)
                     for x in (t, saved))
            assert torch.equal(*dense)


# --------------------------------------------------------------------------- mix_weights random

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,name", CASES)
def test_mix_random_bit_identical_to_reference(device, name, shape, dtype, layout):
    pre, ft, _ = triple(shape, dtype, device, layout)
    keep = Untouched(pre, ft)
    out = ops.mix_weights(pre, ft, 0.37, seed=2024, key="encoder.layer.3.weight", backend=name)
    keep.check()
    flat_pre, flat_ft = pre.contiguous().view(-1).cpu(), ft.contiguous().view(-1).cpu()
    expected = ref.mix_random(flat_pre, flat_ft, 2024, ref.key_hash("encoder.layer.3.weight"),
                              ref.philox_keep_threshold(0.37)).view(shape)
    assert out.shape == pre.shape and out.device == pre.device
    assert_bits_equal(out, expected)


@pytest.mark.parametrize("device,name", CASES)
def test_mix_random_same_mask_on_every_backend_and_key_changes_it(device, name):
    pre, ft, _ = triple((7, 1001), torch.float16, device)
    args = {"seed": 11, "key": "a.weight"}
    out = ops.mix_weights(pre, ft, 0.5, backend=name, **args)
    assert_bits_equal(out, ops.mix_weights(pre, ft, 0.5, backend="torch", **args))
    other = ops.mix_weights(pre, ft, 0.5, seed=11, key="b.weight", backend=name)
    assert bool((bits(other) != bits(out)).any())
    differ = bits(pre) != bits(ft)  # fp16 rounding leaves a few coordinates undrifted
    taken_ft = int(((bits(out) == bits(ft)) & differ).sum())
    eligible = int(differ.sum())
    assert abs(taken_ft - 0.5 * eligible) < 5 * math.sqrt(eligible / 4)


@pytest.mark.parametrize("rho", [0.0, 1.0])
@pytest.mark.parametrize("device,name", CASES)
def test_mix_random_rho_edges(device, name, rho):
    pre, ft, _ = triple((3, 4099), torch.bfloat16, device)
    out = ops.mix_weights(pre, ft, rho, seed=3, key="k", backend=name)
    assert_bits_equal(out, ft if rho == 1.0 else pre)


@pytest.mark.parametrize("device", [dev for dev, name in CASES if name == "triton"])
def test_triton_philox_matches_reference_past_2_pow_32(device):
    kern = bk.module("triton")
    index = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 77, 2**45 + 3, 2**63 - 1],
                         device=device)
    for k0, k1 in [(0, 0), (2**32 - 1, 2**32 - 1), (1, 1), (0x12345678, 0xDEADBEEF)]:
        words = kern.philox_uint32(index, k0, k1).cpu()
        assert torch.equal(words, ref.philox_uint32(index.cpu(), k0, k1))
    assert int(kern.philox_uint32(index[:1], 0, 0)[0]) == 0x6627E8D5


# --------------------------------------------------------------------------- fisher

@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,name", CASES)
def test_fisher_accumulate_three_way(device, name, shape, dtype, layout):
    acc = torch.rand(shape, generator=_gen()).to(device)
    grad = make(shape, dtype, device, layout, scale=3.0)
    start = acc.clone()
    keep = Untouched(grad)
    scale = 0.3
    result = ops.fisher_accumulate_(acc, grad, scale=scale, backend=name)
    keep.check()
    assert result is acc and acc.dtype == torch.float32
    ref64 = start.double() + scale * grad.double() ** 2
    ref_same = ref.fisher_accumulate_(start.clone().cpu(), grad.cpu(), scale)
    three_way(acc, ref_same, ref64, ATOL[torch.float32])


# --------------------------------------------------------------------------- histograms

@pytest.mark.parametrize("indicator", ops.INDICATORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,name", KERNEL_CASES)
def test_score_histogram_counts_identical_to_reference(device, name, shape, dtype, indicator):
    layout = "sliced" if shape[1] > 1 else "contiguous"
    pre, ft, hess = triple(shape, dtype, device, layout)
    keep = Untouched(pre, ft, hess)
    got = ops.score_histogram(pre, ft, hess, indicator=indicator, eps=1e-6, backend=name)
    want = ops.score_histogram(pre, ft, hess, indicator=indicator, eps=1e-6, backend="torch")
    keep.check()
    assert got.total == want.total == pre.numel()
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    # Level 2 under the most populated level-1 bin.
    prefix = int(torch.argmax(want.counts.cpu()))
    level2 = {}
    for b in (name, "torch"):
        h = ops.ScoreHistogram(indicator, 1e-6, torch.zeros(ref.NUM_BINS, dtype=torch.int64),
                               prefix=prefix, total=pre.numel())
        level2[b] = ops.score_histogram(pre, ft, hess, indicator=indicator, eps=1e-6, hist=h,
                                        backend=b).counts.cpu()
    assert torch.equal(level2[name], level2["torch"])
    assert int(level2["torch"].sum()) == int(want.counts.cpu()[prefix])


@pytest.mark.parametrize("device,name", KERNEL_CASES)
def test_histogram_of_identical_weights_lands_in_bin_zero(device, name):
    # Unchanged coordinates all score 0: the kernels' one-bin fast path must count every one.
    pre = make((3, 4099), torch.bfloat16, device)
    ft = pre.clone()
    ft[1, 5] += 1.0
    hist = ops.score_histogram(pre, ft, indicator="drift", backend=name)
    assert int(hist.counts[0]) == pre.numel() - 1
    assert int(hist.counts.sum()) == pre.numel()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's inf
@pytest.mark.parametrize("device,name", KERNEL_CASES)
def test_subnormal_and_huge_scores_count_and_select_identically(device, name):
    # Scores below 2**-126 are subnormal: a kernel that flushes them to zero (ftz) would move them
    # to bin 0. Scores past fp32's range overflow to inf in every backend alike.
    gen = _gen()
    n = 4099
    pre = torch.zeros(n)
    ft = torch.randn(n, generator=gen) * 3e-20          # d*d ~ 1e-39: subnormal scores
    ft[:50] = torch.randn(50, generator=gen) * 1e20     # d*d overflows fp32 -> inf
    hess = torch.rand(n, generator=gen) + 0.5
    pre, ft, hess = pre.to(device), ft.to(device), hess.to(device)
    for indicator in ("drift_over_hessian", "product"):
        got = ops.score_histogram(pre, ft, hess, indicator=indicator, backend=name)
        want = ops.score_histogram(pre, ft, hess, indicator=indicator, backend="torch")
        assert torch.equal(got.counts.cpu(), want.counts.cpu())
        assert int(want.counts.cpu()[1:0x80].sum()) > n // 2  # most scores really are subnormal
        thr = ops.select_threshold(want, 0.5)
        if not thr.exact:
            thr = ops.select_threshold(ops.score_histogram(
                pre, ft, hess, indicator=indicator, hist=thr.refine(), backend="torch"), 0.5)
        assert_bits_equal(ops.reset_by_score(pre, ft, hess, thr, backend=name),
                          ops.reset_by_score(pre, ft, hess, thr, backend="torch"))


# --------------------------------------------------------------------------- selection

@pytest.mark.parametrize("indicator", ops.INDICATORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,name", CASES)
def test_reset_by_score_matches_reference_selection(device, name, layout, dtype, indicator):
    shape = (5, 123)
    pre, ft, hess = triple(shape, dtype, device, layout)
    keep = Untouched(pre, ft, hess)
    thr = ops.global_score_threshold(lambda: [(pre, ft, hess)], 0.2, indicator=indicator,
                                     backend=name)
    out = ops.reset_by_score(pre, ft, hess, thr, backend=name)
    keep.check()
    s = ref.scores(pre.cpu().reshape(-1), ft.cpu().reshape(-1), hess.cpu().reshape(-1),
                   ref.INDICATORS[indicator], 1e-8).view(shape)
    sel = s >= torch.tensor(thr.value, dtype=torch.float32)
    assert_bits_equal(out, torch.where(sel, pre.cpu(), ft.cpu()))
    assert int(sel.sum()) == thr.selected


@pytest.mark.parametrize("rho", [0.0, 0.013, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("device,name", CASES)
def test_selected_count_is_exactly_round_rho_n_without_ties(device, name, rho):
    n = 3 * 4099
    # Distinct drifts spread over many octaves: no ties, and level 1 is rarely the last word.
    pre = torch.zeros(n, dtype=torch.float32)
    ft = torch.exp(torch.linspace(-20, 5, n)[torch.randperm(n, generator=_gen())])
    pre, ft = pre.to(device), ft.to(device)
    hess = torch.ones(n, device=device)
    thr = ops.global_score_threshold(lambda: [(pre, ft, hess)], rho, backend=name)
    target = round(rho * n)
    assert thr.selected == thr.target == target
    out = ops.reset_by_score(pre, ft, hess, thr, backend=name)
    assert int((out == pre).sum()) == target


@pytest.mark.parametrize("device,name", CASES)
def test_ties_at_the_threshold_are_all_selected(device, name):
    gen = _gen()
    n, tied = 2000, 300
    drift = torch.rand(n, generator=gen) + 2.0           # distinct values in [2, 3)
    drift[:tied] = 1.5                                   # one tied block below them
    drift = drift[torch.randperm(n, generator=gen)]
    pre = torch.zeros(n, device=device)
    ft = drift.to(device)
    rho = (n - tied + 100) / n                           # the boundary falls inside the tie
    thr = ops.global_score_threshold(lambda: [(pre, ft, None)], rho, indicator="drift",
                                     backend=name)
    assert thr.target == n - tied + 100
    assert thr.selected == n >= thr.target
    assert thr.value == 1.5
    out = ops.reset_by_score(pre, ft, None, thr, backend=name)
    assert int((out == pre).sum()) == n


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's inf
@pytest.mark.parametrize("device,name", CASES)
def test_rho_zero_selects_nothing_even_infinite_scores(device, name):
    """A target of 0 gives the threshold +inf, and ``score >= inf`` held for infinite scores
    (d*d / (H + eps) with H = 0 and a subnormal eps, |d| past fp32's range): rho = 0 reset or
    kept them. Nothing is selected at rho = 0; rho > 0 still ranks the infinite scores first."""
    pre = torch.zeros(6, device=device)
    ft = torch.tensor([0.5, 1.0, 2.0, 0.0, 0.0, 3.0], device=device)
    h = torch.zeros(6, device=device)
    hist = ops.score_histogram(pre, ft, h, eps=1e-40, backend=name)
    thr = ops.select_threshold(hist, 0.0)
    assert thr.target == thr.selected == 0 and thr.value == math.inf
    out = torch.full_like(ft, 7.0)
    assert ops.reset_by_score(pre, ft, h, thr, out=out, backend=name) is out
    assert_bits_equal(out, ft)
    assert_bits_equal(ops.reset_by_score(
        pre, ft, h, ops.global_score_threshold(lambda: [(pre, ft, h)], 0.0, eps=1e-40,
                                               backend=name), backend=name), ft)
    one = ops.select_threshold(hist, 1 / 6)                       # target 1: the 4 infinite ties
    assert int((ops.reset_by_score(pre, ft, h, one, backend=name) != ft).sum()) == 4
    # magnitude mixing: |d| = inf for the first coordinate (3e38 - (-3e38) overflows fp32)
    pre = torch.tensor([-3e38, 0.0, 1.0], device=device)
    ft = torch.tensor([3e38, 1.0, 2.0], device=device)
    assert_bits_equal(ops.mix_weights(pre, ft, 0.0, select="magnitude", backend=name), pre)
    kept = ops.mix_weights(pre, ft, 0.4, select="magnitude", backend=name)   # target 1
    assert_bits_equal(kept, torch.tensor([3e38, 0.0, 1.0]))


@pytest.mark.parametrize("device,name", CASES)
def test_zero_threshold_leaves_zero_and_subnormal_scores_as_documented(device, name):
    """reset_value floors the threshold at the smallest *normal* fp32 (2**-126), not the smallest
    positive one: a subnormal floor is flushed to 0 under torch.set_flush_denormal(True) and would
    reset every zero score. So positive subnormal scores are not reset, and the docs say so."""
    pre = torch.zeros(4, device=device)
    ft = torch.tensor([1e-4, 1e-4, 1.0, 0.0], device=device)
    h = torch.tensor([1e-33, 1e-36, 1.0, 1.0], device=device)   # scores ~1e-41, ~1e-44, 1, 0
    thr = ops.global_score_threshold(lambda: [(pre, ft, h)], 1.0, indicator="product",
                                     backend=name)
    assert thr.value == 0.0
    assert thr.reset_value == torch.finfo(torch.float32).smallest_normal == 2.0**-126
    out = ops.reset_by_score(pre, ft, h, thr, backend=name)
    assert (out != ft).tolist() == [False, False, True, False]
    doc = " ".join(ops.Threshold.reset_value.__doc__.split())
    assert "smallest *normal* fp32" in doc and "subnormal" in doc
    assert "smallest positive fp32" not in doc
    reset_doc = " ".join(ops.reset_by_score.__doc__.split())
    assert "resets only positive scores" not in reset_doc
    assert "subnormal scores are never reset" in reset_doc


@pytest.mark.parametrize("device,name", CASES)
def test_two_pass_refinement_when_level_one_is_not_exact(device, name):
    n = 4099
    # |d| in [1, 1 + 2**-7): every score shares the high 16 bits 0x3F80, so one level-1 bin holds
    # all of them and only the level-2 pass can split it.
    steps = torch.randperm(n, generator=_gen()).to(torch.float32)
    ft = (1.0 + steps * 2.0**-23).to(device)
    pre = torch.zeros(n, device=device)
    hist = ops.score_histogram(pre, ft, indicator="drift", backend=name)
    assert int(hist.counts[0x3F80]) == n
    first = ops.select_threshold(hist, 0.25)
    assert not first.exact
    hist2 = ops.score_histogram(pre, ft, indicator="drift", hist=first.refine(), backend=name)
    second = ops.select_threshold(hist2, 0.25)
    k = round(0.25 * n)
    kth = torch.sort(ft.cpu(), descending=True).values[k - 1]
    assert second.exact and second.selected == k and second.value == float(kth)
    assert ops.global_score_threshold(lambda: [(pre, ft, None)], 0.25, indicator="drift",
                                      backend=name) == second


@pytest.mark.parametrize("device,name", CASES)
def test_global_threshold_over_several_tensors_equals_sorted_top_k(device, name):
    shapes = [(5, 123), (1, 1), (3, 4099), (64,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    tensors = []
    for shape, dtype in zip(shapes, dtypes):
        shape2 = shape if len(shape) == 2 else (1, shape[0])
        pre, ft, hess = triple(shape2, dtype, device)
        tensors.append((pre.reshape(shape), ft.reshape(shape), hess.reshape(shape)))
    calls = []

    def source():
        calls.append(1)
        return iter(tensors)

    all_scores = torch.cat([ref.scores(p.cpu().reshape(-1), f.cpu().reshape(-1),
                                       h.cpu().reshape(-1), 0, 1e-8) for p, f, h in tensors])
    n = all_scores.numel()
    for rho in (0.05, 0.3):
        calls.clear()
        thr = ops.global_score_threshold(source, rho, backend=name)
        k = round(rho * n)
        top = torch.sort(all_scores, descending=True).values
        assert float(top[k - 1]) > float(top[k])  # no tie at the boundary: top-k is one set
        selected = all_scores >= thr.value
        assert int(selected.sum()) == thr.selected == k
        assert float(top[k - 1]) >= thr.value > float(top[k])
        assert len(calls) in (1, 2)
        # Coordinates with zero drift (bf16/fp16 rounding) are never selected but equal pre anyway.
        total = sum(int(((ops.reset_by_score(p, f, h, thr, backend=name) == p) & (p != f)).sum())
                    for p, f, h in tensors)
        assert total == k


@pytest.mark.parametrize("rho", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,name", CASES)
def test_magnitude_mixing_keeps_the_largest_drifts(device, name, dtype, rho):
    n = 5 * 123
    # 128 mantissa steps per octave over 5 octaves: distinct values, all exact in bf16 and fp16.
    v = torch.arange(n, dtype=torch.float32)
    d = ((1 + (v % 128) / 128) * 2.0 ** (v // 128 - 2))[torch.randperm(n, generator=_gen())]
    sign = torch.where(torch.rand(n, generator=_gen()) < 0.5, -1.0, 1.0)
    pre = torch.zeros(5, 123, dtype=dtype, device=device)
    ft = (sign * d).view(5, 123).to(dtype).to(device)
    keep = Untouched(pre, ft)
    out = ops.mix_weights(pre, ft, rho, select="magnitude", backend=name)
    keep.check()
    k = round(rho * n)
    kept = (out != pre).view(-1).cpu()
    truth = torch.zeros(n, dtype=torch.bool)
    truth[torch.topk(ft.float().abs().view(-1).cpu(), k).indices] = True
    assert torch.equal(kept, truth)
    assert_bits_equal(out, torch.where(truth.view(5, 123), ft.cpu(), pre.cpu()))


# --------------------------------------------------------------------------- out=

@pytest.mark.parametrize("device,name", CASES)
def test_out_argument_contiguous_and_strided(device, name):
    pre, ft, hess = triple((5, 123), torch.float16, device)
    expected = ops.mix_weights(pre, ft, 0.4, seed=9, key="w", backend="torch")
    out = torch.empty_like(pre)
    assert ops.mix_weights(pre, ft, 0.4, seed=9, key="w", out=out, backend=name) is out
    assert_bits_equal(out, expected)
    backing = torch.full((123, 5), 7.0, dtype=torch.float16, device=device)
    strided = backing.t()
    assert not strided.is_contiguous()
    assert ops.mix_weights(pre, ft, 0.4, seed=9, key="w", out=strided, backend=name) is strided
    assert_bits_equal(strided, expected)
    reset_expected = ops.reset_by_score(pre, ft, hess, 1e-3, backend="torch")
    backing2 = torch.zeros(5, 246, dtype=torch.float16, device=device)
    sliced = backing2[:, ::2]
    ops.reset_by_score(pre, ft, hess, 1e-3, out=sliced, backend=name)
    assert_bits_equal(sliced, reset_expected)
    assert bool((backing2[:, 1::2] == 0).all())  # the gaps of a strided out stay untouched


@pytest.mark.parametrize("device,name", CASES)
def test_partly_overlapping_output_and_input_are_refused(device, name):
    """An output sharing memory with an input at another offset: the C++ kernels read elements
    already overwritten (fisher gave 2.3e17 for 43). Refused on every backend, inputs untouched;
    the identical tensor (out=pretrained, acc is grad) keeps working."""
    buf = torch.arange(1.0, 10.0, device=device)
    keep = Untouched(buf)
    with pytest.raises(ValueError, match="acc partly overlaps grad in memory"):
        ops.fisher_accumulate_(buf[1:7], buf[0:6], backend=name)
    ft = torch.full((8,), -1.0, device=device)
    h = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="out partly overlaps pretrained in memory"):
        ops.mix_weights(buf[0:8], ft, 0.5, seed=1, out=buf[1:9], backend=name)
    with pytest.raises(ValueError, match="out partly overlaps finetuned in memory"):
        ops.mix_weights(ft, buf[1:9], 0.5, seed=1, out=buf[0:8], backend=name)
    with pytest.raises(ValueError, match="out partly overlaps pretrained"):
        ops.mix_weights(buf[0:8], ft, 0.5, select="magnitude", out=buf[1:9], backend=name)
    with pytest.raises(ValueError, match="out partly overlaps hessian"):
        ops.reset_by_score(ft, ft + 1, buf[1:9], 0.1, out=buf[0:8], backend=name)
    with pytest.raises(ValueError, match="out partly overlaps pretrained"):
        ops.reset_by_score(buf[0:8], ft, h, 0.1, out=buf[1:9], backend=name)
    with pytest.raises(ValueError, match="out partly overlaps pretrained"):  # other strides
        ops.mix_weights(buf[0:8].view(2, 4), ft.view(2, 4), 0.5, out=buf[0:8].view(4, 2).t(),
                        backend=name)
    keep.check()
    # the identical tensor: every element is read before its own result is written
    pre, ft, hess = triple((5, 123), torch.float32, device)
    want = ops.mix_weights(pre, ft, 0.4, seed=9, key="w", backend="torch")
    same = pre.clone()
    assert ops.mix_weights(same, ft, 0.4, seed=9, key="w", out=same, backend=name) is same
    assert_bits_equal(same, want)
    want = ops.reset_by_score(pre, ft, hess, 1e-3, backend="torch")
    same = ft.clone()
    ops.reset_by_score(pre, same, hess, 1e-3, out=same, backend=name)
    assert_bits_equal(same, want)
    acc = torch.rand(5, 123, device=device)
    want = acc + acc * acc
    assert ops.fisher_accumulate_(acc, acc, backend=name) is acc
    torch.testing.assert_close(acc, want, rtol=0, atol=0)


@pytest.mark.parametrize("device,name", CASES)
def test_no_op_records_autograd_on_any_backend(device, name):
    """Weight edits are not layers: given inputs that require grad, no backend returns a tensor
    with a graph (the torch backend used to, the compiled ones cannot), and the values agree."""
    pre, ft, hess = triple((7, 33), torch.float32, device)
    ft = ft.clone().requires_grad_(True)
    emb_ft = ft.detach().clone().requires_grad_(True)
    acc = torch.zeros(7, 33, dtype=torch.float32, device=device)
    outs = {
        "mix": ops.mix_weights(pre, ft, 0.4, seed=3, key="w", backend=name),
        "mix magnitude": ops.mix_weights(pre, ft, 0.4, select="magnitude", backend=name),
        "reset": ops.reset_by_score(pre, ft, hess, 1e-3, backend=name),
        "fisher": ops.fisher_accumulate_(acc, ft, backend=name),
        "e-pur": ops.embedding_drift_scores(pre, emb_ft, torch.ones(7, device=device),
                                            backend=name),
    }
    for what, out in outs.items():
        assert not out.requires_grad and out.grad_fn is None, what
    assert_bits_equal(outs["mix"], ops.mix_weights(pre, ft.detach(), 0.4, seed=3, key="w",
                                                   backend="torch"))


# --------------------------------------------------------------------------- E-PUR

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,name", CASES)
def test_embedding_drift_scores_three_way(device, name, shape, dtype, layout):
    pre, ft, _ = triple(shape, dtype, device, layout)
    freqs = torch.randint(0, 3000, (shape[0],), generator=_gen()).to(device)
    freqs[0] = 3  # a rare token below c
    keep = Untouched(pre, ft, freqs)
    out = ops.embedding_drift_scores(pre, ft, freqs, c=20.0, backend=name)
    keep.check()
    assert out.dtype == torch.float32 and out.shape == (shape[0],) and out.device == pre.device
    d = ft.double() - pre.double()
    ref64 = d.pow(2).sum(1).sqrt() / torch.log(freqs.double().clamp_min(20.0))
    ref_same = ref.embedding_drift_scores(pre.contiguous().cpu(), ft.contiguous().cpu(),
                                          freqs.float().cpu(), 20.0)
    # fp32 accumulation over up to 4099 terms plus log/sqrt: a relative allowance on top of atol.
    three_way(out, ref_same, ref64, ATOL[torch.float32] + 1e-5 * float(ref64.abs().max()))


# --------------------------------------------------------------------------- bad inputs

def _cpu_triple(n=16, dtype=torch.float32):
    gen = _gen()
    return (torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype),
            torch.rand(n, generator=gen))


BAD_CALLS = [
    ("shape", lambda p, f, h: ops.mix_weights(p, f[:-1], 0.5), ValueError,
     r"finetuned shape \(15,\) does not match pretrained shape \(16,\)"),
    ("dtype", lambda p, f, h: ops.mix_weights(p, f.half(), 0.5), TypeError,
     "finetuned dtype torch.float16 does not match pretrained dtype torch.float32"),
    ("not a tensor", lambda p, f, h: ops.mix_weights(p.tolist(), f, 0.5), TypeError,
     "pretrained must be a torch.Tensor"),
    ("integer", lambda p, f, h: ops.mix_weights(p.long(), f.long(), 0.5), TypeError,
     "pretrained must be a floating-point tensor"),
    ("rho high", lambda p, f, h: ops.mix_weights(p, f, 1.5), ValueError,
     r"rho must be in \[0, 1\], got 1.5"),
    ("rho low", lambda p, f, h: ops.mix_weights(p, f, -0.1), ValueError,
     r"rho must be in \[0, 1\]"),
    ("rho nan", lambda p, f, h: ops.mix_weights(p, f, float("nan")), ValueError,
     r"rho must be in \[0, 1\]"),
    ("rho type", lambda p, f, h: ops.mix_weights(p, f, "half"), TypeError, "rho must be a number"),
    ("select", lambda p, f, h: ops.mix_weights(p, f, 0.5, select="topk"), ValueError,
     "select must be one of"),
    ("seed", lambda p, f, h: ops.mix_weights(p, f, 0.5, seed=-1), ValueError,
     r"seed must be an int in \[0, 2\*\*32\)"),
    ("seed bool", lambda p, f, h: ops.mix_weights(p, f, 0.5, seed=True), ValueError,
     r"seed must be an int in \[0, 2\*\*32\), got True"),
    ("seed float tensor", lambda p, f, h: ops.mix_weights(p, f, 0.5, seed=torch.tensor(3.0)),
     ValueError, r"seed must be an int in \[0, 2\*\*32\)"),
    ("seed big tensor", lambda p, f, h: ops.mix_weights(p, f, 0.5, seed=torch.tensor(2**32)),
     ValueError, r"seed must be an int in \[0, 2\*\*32\), got 4294967296"),
    ("key", lambda p, f, h: ops.mix_weights(p, f, 0.5, key=3), TypeError, "key must be a str"),
    ("empty", lambda p, f, h: ops.mix_weights(p[:0], f[:0], 0.5), ValueError,
     r"pretrained is empty \(shape \(0,\)\)"),
    ("out shape", lambda p, f, h: ops.mix_weights(p, f, 0.5, out=torch.empty(3)), ValueError,
     r"out must have shape \(16,\)"),
    ("out dtype", lambda p, f, h: ops.mix_weights(p, f, 0.5, out=torch.empty(16).half()),
     ValueError, "out must have shape .* dtype torch.float32"),
    ("out type", lambda p, f, h: ops.mix_weights(p, f, 0.5, out=[0.0] * 16), TypeError,
     "out must be a torch.Tensor"),
    ("backend", lambda p, f, h: ops.mix_weights(p, f, 0.5, backend="numpy"), ValueError,
     "backend must be one of 'auto', 'torch', 'triton', 'cpp', 'cuda'; got 'numpy'"),
    ("indicator", lambda p, f, h: ops.score_histogram(p, f, h, indicator="fisher"), ValueError,
     "indicator must be one of .*; got 'fisher'"),
    ("hessian missing", lambda p, f, h: ops.score_histogram(p, f, None), ValueError,
     "indicator 'drift_over_hessian' needs a hessian tensor"),
    ("hessian missing reset", lambda p, f, h: ops.reset_by_score(p, f, None, 0.1,
                                                                 indicator="product"),
     ValueError, "indicator 'product' needs a hessian tensor"),
    ("hessian shape", lambda p, f, h: ops.score_histogram(p, f, h[:4]), ValueError,
     r"hessian shape \(4,\) does not match pretrained shape \(16,\)"),
    ("eps", lambda p, f, h: ops.score_histogram(p, f, h, eps=0.0), ValueError,
     "eps must be a positive finite number"),
    ("hist type", lambda p, f, h: ops.score_histogram(p, f, h, hist=torch.zeros(65536)),
     TypeError, "hist must be a ScoreHistogram or None, got Tensor"),
    ("hist mismatch", lambda p, f, h: ops.score_histogram(
        p, f, h, indicator="product", hist=ops.score_histogram(p, f, h)), ValueError,
     "hist was built with indicator='drift_over_hessian'"),
    ("hist counts dtype", lambda p, f, h: ops.score_histogram(p, f, h, hist=ops.ScoreHistogram(
        "drift_over_hessian", 1e-8, torch.zeros(65536, dtype=torch.int32))), TypeError,
     r"hist.counts must be an int64 tensor of shape \(65536,\), got torch.int32"),
    ("hist counts bins", lambda p, f, h: ops.score_histogram(p, f, h, hist=ops.ScoreHistogram(
        "drift_over_hessian", 1e-8, torch.zeros(256, dtype=torch.int64))), TypeError,
     r"hist.counts must be an int64 tensor .* got torch.int64 \(256,\)"),
    ("threshold hist type", lambda p, f, h: ops.select_threshold(torch.zeros(65536), 0.5),
     TypeError, "hist must be a ScoreHistogram"),
    ("threshold rho", lambda p, f, h: ops.select_threshold(ops.score_histogram(p, f, h), 2),
     ValueError, r"rho must be in \[0, 1\]"),
    ("threshold nan", lambda p, f, h: ops.reset_by_score(p, f, h, float("nan")), ValueError,
     "threshold is NaN"),
    ("threshold type", lambda p, f, h: ops.reset_by_score(p, f, h, "top"), TypeError,
     "threshold must be a Threshold or a float"),
    ("threshold indicator", lambda p, f, h: ops.reset_by_score(
        p, f, h, ops.global_score_threshold(lambda: [(p, f, h)], 0.5), indicator="drift"),
     ValueError, "indicator 'drift' differs from the threshold's 'drift_over_hessian'"),
    ("refine exact", lambda p, f, h: ops.global_score_threshold(lambda: [(p, f, h)], 0.0).refine(),
     ValueError, "already exact"),
    ("nothing yielded", lambda p, f, h: ops.global_score_threshold(list, 0.5), ValueError,
     "tensors\\(\\) yielded nothing"),
    # A one-shot iterator is empty on the refinement pass (scores 1 + k·1e-5 share a level-1 bin).
    ("one-shot tensors", lambda p, f, h: ops.global_score_threshold(
        lambda it=iter([(p * 0, 1 + torch.linspace(0, 1e-3, 16), None)]): it, 0.3,
        indicator="drift"), ValueError, "must yield the same tensors on every call: 16 scores"),
    ("eps type", lambda p, f, h: ops.score_histogram(p, f, h, eps="tiny"), TypeError,
     "eps must be a positive finite number, got 'tiny'"),
    ("hessian negative", lambda p, f, h: ops.score_histogram(p, f, h - 2.0), ValueError,
     "hessian has 16 negative value"),
    ("hessian negative unchecked", lambda p, f, h: ops.score_histogram(
        p, f, h - 2.0, check_finite=False), ValueError, "hessian has 16 negative value"),
    ("hessian negative reset", lambda p, f, h: ops.reset_by_score(p, f, h - 2.0, 0.1), ValueError,
     "hessian has 16 negative value"),
    ("acc dtype", lambda p, f, h: ops.fisher_accumulate_(h.double(), f), TypeError,
     "acc must be float32"),
    ("acc strided", lambda p, f, h: ops.fisher_accumulate_(torch.zeros(4, 8).t(), f.view(8, 2)),
     ValueError, "acc must be contiguous"),
    ("grad shape", lambda p, f, h: ops.fisher_accumulate_(h, f[:3]), ValueError,
     r"grad shape \(3,\) does not match acc shape \(16,\)"),
    ("scale", lambda p, f, h: ops.fisher_accumulate_(h, f, scale=float("inf")), ValueError,
     "scale must be finite"),
    ("emb dims", lambda p, f, h: ops.embedding_drift_scores(p, f, h), ValueError,
     r"pretrained_emb must be 2-D \[vocab, dim\]"),
    ("emb freqs shape", lambda p, f, h: ops.embedding_drift_scores(p.view(4, 4), f.view(4, 4), h),
     ValueError, r"token_freqs must have shape \(4,\)"),
    ("emb freqs type", lambda p, f, h: ops.embedding_drift_scores(p.view(4, 4), f.view(4, 4),
                                                                  [1, 2, 3, 4]),
     TypeError, "token_freqs must be a torch.Tensor"),
    ("emb freqs negative", lambda p, f, h: ops.embedding_drift_scores(
        p.view(4, 4), f.view(4, 4), -h[:4]), ValueError,
     "token_freqs must be finite and non-negative"),
    ("emb c", lambda p, f, h: ops.embedding_drift_scores(p.view(4, 4), f.view(4, 4), h[:4], c=1.0),
     ValueError, r"c must be a finite number > 1"),
    # above 1 in fp64 but exactly 1.0 in fp32, where the kernels take it: log(c) = 0, inf/NaN scores
    ("emb c 1 in fp32", lambda p, f, h: ops.embedding_drift_scores(
        p.view(4, 4), f.view(4, 4), h[:4], c=1.00000001), ValueError,
     r"c must be a finite number > 1 \(log\(c\) must be positive\), got 1.00000001 "
     r"\(1.0 in float32\)"),
    ("emb c inf in fp32", lambda p, f, h: ops.embedding_drift_scores(
        p.view(4, 4), f.view(4, 4), h[:4], c=1e39), ValueError,
     r"c must be a finite number > 1 .*got 1e\+39 \(inf in float32\)"),
    ("emb shape", lambda p, f, h: ops.embedding_drift_scores(p.view(4, 4), f.view(2, 8), h[:4]),
     ValueError, r"finetuned_emb shape \(2, 8\) does not match pretrained_emb shape \(4, 4\)"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise_naming_the_argument(name, call, exc, match):
    p, f, h = _cpu_triple()
    with pytest.raises(exc, match=match):
        call(p, f, h)


@pytest.mark.parametrize("device", [dev for dev, name in CASES if name == "triton"])
def test_triton_launchers_reject_what_would_read_the_wrong_memory(device):
    kern = bk.module("triton")
    pre, ft = torch.randn(8, 8, device=device), torch.randn(8, 8, device=device)
    out = torch.empty(64, device=device)
    with pytest.raises(ValueError, match="pre must be contiguous"):
        kern.mix_random(pre.t(), ft.view(-1), out, 0, 0, 1)
    with pytest.raises(TypeError, match="ft must be torch.float32, got torch.float16"):
        kern.mix_random(pre.view(-1), ft.half().view(-1), out, 0, 0, 1)
    with pytest.raises(ValueError, match=r"keep_threshold must be an int in \[0, 4294967297\)"):
        kern.mix_random(pre.view(-1), ft.view(-1), out, 0, 0, 2**32 + 1)
    with pytest.raises(ValueError, match="out has 63 elements but pre has 64"):
        kern.mix_random(pre.view(-1), ft.view(-1), out[:63], 0, 0, 1)
    hist = torch.zeros(ref.NUM_BINS, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="hist must be torch.int64"):
        kern.score_histogram(pre.view(-1), ft.view(-1), None, 1, 1e-8, hist, -1)
    with pytest.raises(ValueError, match="indicator code 0 needs a hessian"):
        kern.select_by_score(pre.view(-1), ft.view(-1), None, 0, 1e-8, 0.5, True, out)
    with pytest.raises(TypeError, match="hessian must be torch.float32"):
        kern.select_by_score(pre.view(-1), ft.view(-1), ft.view(-1).half(), 0, 1e-8, 0.5, True,
                             out)
    with pytest.raises(ValueError, match=r"freqs must be \[8\]"):
        kern.embedding_drift_scores(pre, ft, torch.ones(7, device=device), 20.0,
                                    torch.empty(8, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch_raises():
    p, f, h = _cpu_triple()
    with pytest.raises(ValueError, match="finetuned is on cuda:0 but pretrained is on cpu"):
        ops.mix_weights(p, f.cuda(), 0.5)
    with pytest.raises(ValueError, match="hessian is on cuda:0 but pretrained is on cpu"):
        ops.score_histogram(p, f, h.cuda())
    with pytest.raises(ValueError, match="grad is on cuda:0 but acc is on cpu"):
        ops.fisher_accumulate_(h, f.cuda())


def test_device_mismatch_raises_on_meta_tensors():
    # Without a GPU a second device type still exists: the meta device.
    p, f, h = _cpu_triple()
    with pytest.raises(ValueError, match="finetuned is on meta but pretrained is on cpu"):
        ops.mix_weights(p, f.to("meta"), 0.5)
    with pytest.raises(ValueError, match="hessian is on meta but pretrained is on cpu"):
        ops.reset_by_score(p, f, h.to("meta"), 0.1)
    with pytest.raises(ValueError, match="out must have shape .* device cpu"):
        ops.mix_weights(p, f, 0.5, out=torch.empty(16, device="meta"))


@pytest.mark.parametrize("device,name", CASES)
def test_nan_and_inf_rejected_by_default_and_allowed_on_request(device, name):
    p, f, h = (t.to(device) for t in _cpu_triple(64))
    f[3] = float("nan")
    p[10] = float("inf")
    with pytest.raises(ValueError, match=r"pretrained contains 1 NaN/Inf value\(s\)"):
        ops.mix_weights(p, f, 0.5, backend=name)
    with pytest.raises(ValueError, match="check_finite=False"):
        ops.score_histogram(p, f, h, backend=name)
    h_bad = h.clone()
    h_bad[0] = float("inf")
    with pytest.raises(ValueError, match="hessian contains 1 NaN/Inf"):
        ops.reset_by_score(p.nan_to_num(), f.nan_to_num(), h_bad, 0.1, backend=name)
    g = f.clone()
    with pytest.raises(ValueError, match="grad contains 1 NaN/Inf"):
        ops.fisher_accumulate_(torch.zeros(64, device=device), g, backend=name)
    with pytest.raises(ValueError, match="finetuned_emb contains 1 NaN/Inf"):
        ops.embedding_drift_scores(p.nan_to_num().view(8, 8), f.view(8, 8),
                                   torch.ones(8, device=device), backend=name)
    # Allowed through: a mask is still a select, so the non-finite values are copied bit for bit.
    out = ops.mix_weights(p, f, 0.5, seed=1, key="nan", backend=name, check_finite=False)
    assert_bits_equal(out, ops.mix_weights(p, f, 0.5, seed=1, key="nan", backend="torch",
                                           check_finite=False))
    hist = ops.score_histogram(p, f, h, backend=name, check_finite=False)
    assert int(hist.counts.sum()) == 64
    acc = ops.fisher_accumulate_(torch.zeros(64, device=device), g, backend=name,
                                 check_finite=False)
    others = torch.arange(64, device=device) != 3
    assert bool(acc[3].isnan()) and bool(torch.isfinite(acc[others]).all())


@pytest.mark.parametrize("device,name", KERNEL_CASES)
def test_fp64_needs_the_torch_backend(device, name):
    p, f, _h = (t.double().to(device) for t in _cpu_triple())
    with pytest.raises(TypeError, match=f"backend '{name}' supports float32, float16 and bfloat16"):
        ops.mix_weights(p, f, 0.5, backend=name)
    # auto quietly runs fp64 on the reference
    auto = ops.mix_weights(p, f, 0.5, backend="auto")
    assert auto.dtype == torch.float64
    assert torch.equal(auto, ops.mix_weights(p, f, 0.5, backend="torch"))


def test_torch_backend_in_chunks_equals_the_whole_tensor_reference(monkeypatch):
    """The torch backend runs the reference over chunks (bounded memory); with chunks of 7 the
    Philox counters, histograms and selections must equal the reference on the whole tensor."""
    import purify_fast.ops.weight_space as ws

    gen = _gen()
    p, f = torch.randn(5, 13, generator=gen), torch.randn(5, 13, generator=gen)
    h = torch.rand(5, 13, generator=gen)
    monkeypatch.setattr(ws, "TORCH_CHUNK", 7)
    key, keep = ref.key_hash("w"), ref.philox_keep_threshold(0.4)
    assert_bits_equal(ops.mix_weights(p, f, 0.4, seed=3, key="w", backend="torch"),
                      ref.mix_random(p.view(-1), f.view(-1), 3, key, keep).view(5, 13))
    hist = ops.score_histogram(p, f, h, backend="torch")
    whole = torch.zeros(ws.NUM_BINS, dtype=torch.int64)
    ref.score_histogram(p.view(-1), f.view(-1), h.view(-1), 0, 1e-8, whole, -1)
    assert torch.equal(hist.counts, whole)
    thr = ops.global_score_threshold(lambda: [(p, f, h)], 0.3, backend="torch")
    assert_bits_equal(ops.reset_by_score(p, f, h, thr, backend="torch"),
                      ref.select_by_score(p, f, h, 0, 1e-8, thr.reset_value, False))


# --------------------------------------------------------------------------- backend choice

def test_backend_env_variable_picks_the_backend(monkeypatch):
    p, f, _h = _cpu_triple()
    monkeypatch.setenv(bk.ENV_VAR, "torch")
    assert bk.resolve(None, p.device, p.dtype) == "torch"
    monkeypatch.setenv(bk.ENV_VAR, "TORCH")
    assert bk.resolve(None, p.device, p.dtype) == "torch"
    monkeypatch.setenv(bk.ENV_VAR, "auto")
    assert bk.resolve(None, p.device, p.dtype) == ("cpp" if "cpp" in bk.available("cpu") else
                                                   "torch")
    monkeypatch.setenv(bk.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="the PURIFY_FAST_BACKEND variable must be one of .*got 'fortran'"):
        ops.mix_weights(p, f, 0.5)
    # An explicit argument wins over the variable.
    assert_bits_equal(ops.mix_weights(p, f, 0.5, backend="torch"),
                      ref.mix_random(p, f, 0, ref.key_hash(""), ref.philox_keep_threshold(0.5)))


def test_backend_argument_type_and_available_devices():
    p, f, _h = _cpu_triple()
    with pytest.raises(TypeError, match="backend must be a str or None, got int 3"):
        ops.mix_weights(p, f, 0.5, backend=3)
    with pytest.raises(ValueError, match="device 'bogus' is not a torch device"):
        bk.available("bogus")
    if not torch.cuda.is_available():
        assert bk.available("cuda") == []  # nothing runs on a device torch cannot see


def test_seed_accepts_any_integer_type_in_range():
    """NumPy integers and 0-d integer tensors are seeds like the int they hold (they were refused
    as "not an int in [0, 2**32)" while True was accepted)."""
    np = pytest.importorskip("numpy")
    p, f, _h = _cpu_triple(64)
    want = ops.mix_weights(p, f, 0.5, seed=3, key="w", backend="torch")
    for seed in (np.int64(3), np.uint32(3), np.int8(3), torch.tensor(3),
                 torch.tensor(3, dtype=torch.uint8)):
        assert_bits_equal(ops.mix_weights(p, f, 0.5, seed=seed, key="w", backend="torch"), want)
    big = ops.mix_weights(p, f, 0.5, seed=2**32 - 1, backend="torch")
    assert_bits_equal(ops.mix_weights(p, f, 0.5, seed=np.uint32(2**32 - 1), backend="torch"), big)
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor([3]), 3.0):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            ops.mix_weights(p, f, 0.5, seed=bad)


def test_module_of_a_backend_without_kernels_raises_a_clear_error():
    with pytest.raises(ValueError, match="backend 'torch' has no kernel module: it runs "
                                         "purify_fast.reference directly"):
        bk.module("torch")
    with pytest.raises(ValueError, match=r"backend 'numpy' is not a kernel backend; module\(\) "
                                         "takes one of 'cpp', 'cuda', 'triton'"):
        bk.module("numpy")


def test_auto_reads_the_env_variable_whose_backend_leaves_fp64_to_torch(monkeypatch):
    """backend=None and backend="auto" both read PURIFY_FAST_BACKEND (the docs said so; "auto"
    ignored it). A backend the variable names leaves what its kernels cannot take (fp64, a shape
    in ``skip``) to torch, as auto does; the same backend named in the call still refuses it."""
    monkeypatch.setattr(bk, "_cpp", lambda: (object(), ""))  # a stand-in: only resolve() asks
    cpu = torch.device("cpu")
    monkeypatch.setenv(bk.ENV_VAR, "torch")
    for backend in (None, "auto", "AUTO"):
        assert bk.resolve(backend, cpu, torch.float32) == "torch"
    assert bk.resolve("cpp", cpu, torch.float32) == "cpp"          # the argument wins
    assert bk.fastest(cpu, torch.float32) == "cpp"                 # what auto alone would pick
    monkeypatch.setenv(bk.ENV_VAR, "cpp")
    for backend in (None, "auto"):
        assert bk.resolve(backend, cpu, torch.float32) == "cpp"
        assert bk.resolve(backend, cpu, torch.float64) == "torch"
        assert bk.resolve(backend, cpu, torch.float32, skip=("cpp",)) == "torch"
    with pytest.raises(TypeError, match="backend 'cpp' supports float32, float16 and bfloat16"):
        bk.resolve("cpp", cpu, torch.float64)
    assert bk.resolve("cpp", cpu, torch.float32, skip=("cpp",)) == "cpp"
    p, f, _h = _cpu_triple()
    p, f = p.double(), f.double()
    want = ops.mix_weights(p, f, 0.5, backend="torch")
    for backend in (None, "auto"):
        assert torch.equal(ops.mix_weights(p, f, 0.5, backend=backend), want)
    monkeypatch.setenv(bk.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="the PURIFY_FAST_BACKEND variable must be one of"):
        ops.mix_weights(p, f, 0.5, backend="auto")


_LATE_INTERPRET = r"""
import os, sys
import torch
from purify_fast import backend as bk, ops
assert "triton" not in bk.available("cpu")        # imports the kernels, compiled for a GPU
os.environ["TRITON_INTERPRET"] = "1"
print("AVAILABLE", bk.available("cpu"))
try:
    ops.mix_weights(torch.zeros(4), torch.ones(4), 0.5, backend="triton")
    print("RAN")
except bk.BackendUnavailable as exc:
    print("UNAVAILABLE", exc)
print("DESCRIBE", bk.describe().replace(chr(10), " | "))
"""


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CUDA present: Triton runs without the interpreter")
def test_triton_interpret_set_after_the_kernels_were_imported_is_reported():
    """Triton picks the interpreter when a kernel is defined: setting TRITON_INTERPRET=1 after
    purify_fast imported its kernels listed 'triton' as available and then crashed with
    "0 active drivers". It is now unavailable, saying to set the variable at start-up."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", bk.ENV_VAR)}
    proc = subprocess.run([sys.executable, "-c", _LATE_INTERPRET], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "triton" not in lines["AVAILABLE"]
    assert "RAN" not in proc.stdout
    assert "TRITON_INTERPRET=1 was set after purify_fast's Triton kernels were imported" in \
        lines["UNAVAILABLE"]
    assert "fix: set TRITON_INTERPRET=1 at start-up, before importing purify_fast" in \
        lines["UNAVAILABLE"]
    assert "before importing purify_fast" in lines["DESCRIBE"]


def test_env_variable_naming_an_unusable_backend_raises_with_a_fix(monkeypatch):
    p, f, _h = _cpu_triple()
    monkeypatch.setenv(bk.ENV_VAR, "cuda")
    with pytest.raises(bk.BackendUnavailable, match="backend 'cuda' cannot run here: .*fix: "):
        ops.mix_weights(p, f, 0.5)


def test_named_unavailable_backend_raises_with_a_fix(monkeypatch):
    p, f, h = _cpu_triple()
    with pytest.raises(bk.BackendUnavailable, match="backend 'cuda' cannot run here.*fix: on a "
                                                    "machine with a CUDA torch and nvcc"):
        ops.fisher_accumulate_(h, f, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(bk.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.reset_by_score(p, f, h, 0.1, backend="triton")


def test_missing_extension_raises_the_import_error_with_a_fix(monkeypatch):
    monkeypatch.setattr(bk, "_cpp", lambda: (None, ("ModuleNotFoundError: No module named "
                                                   "'purify_fast._C'")))
    p, f, _h = _cpu_triple()
    with pytest.raises(bk.BackendUnavailable,
                       match=r"No module named 'purify_fast._C'.*fix: reinstall with a C\+\+"):
        ops.mix_weights(p, f, 0.5, backend="cpp")
    assert "cpp" not in bk.available("cpu")
    assert bk.resolve("auto", p.device, p.dtype) == "torch"


def test_cuda_build_for_another_gpu_is_reported_with_the_rebuild_command(monkeypatch):
    """An extension built for sm_90 on an sm_80 GPU: the module's own probe says so, and the
    backend turns that into "unavailable" with the arch to rebuild for (no GPU needed here)."""
    class Built:
        def __init__(self, answer):
            self.answer, self.asked = answer, []

        def kernel_image_error(self, device):
            self.asked.append(device)
            return self.answer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    wrong = Built("no kernel image is available for execution on the device")
    why = bk._cuda_arch_mismatch(wrong)
    assert wrong.asked == [1]
    assert "NVIDIA A100 (sm_80): no kernel image is available" in why
    assert "PURIFY_FAST_CUDA_ARCH=-arch=sm_80 pip install" in why
    assert bk._cuda_arch_mismatch(Built("")) == ""
    assert bk._cuda_arch_mismatch(object()) == ""  # an older build without the probe


# --------------------------------------------------------------------------- property

@pytest.mark.parametrize("device,name", CASES)
def test_threshold_selects_exactly_the_sorted_top_set(device, name):
    """Any data, any rho: the coordinates with ``score >= thr.value`` are exactly those with a
    score >= the target-th largest (ties included), whichever radix level decided."""
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(
        drifts=st.lists(st.one_of(
            st.integers(0, 6).map(lambda i: i / 4),                       # heavy ties, zeros
            st.floats(1.0, 1.0078125, width=32),                          # one level-1 bin
            st.floats(2.0**-100, 2.0**100, width=32)), min_size=1, max_size=300),
        rho=st.floats(0.0, 1.0),
        dtype=st.sampled_from([torch.float32, torch.bfloat16]))
    def check(drifts, rho, dtype):
        ft = torch.tensor(drifts, dtype=torch.float32).to(dtype).to(device)
        pre = torch.zeros_like(ft)
        thr = ops.global_score_threshold(lambda: [(pre, ft, None)], rho, indicator="drift",
                                         backend=name)
        s = ft.float().abs().cpu()
        target = round(rho * s.numel())
        assert thr.target == target
        chosen = s >= thr.value
        if target == 0:
            assert not bool(chosen.any())
            return
        kth = torch.sort(s, descending=True).values[target - 1]
        assert torch.equal(chosen, s >= kth)
        assert thr.selected == int(chosen.sum()) >= target

    check()


# --------------------------------------------------------------------------- GPU lowering

_COMPILE_SM90 = r"""
import json, linecache, os, re, sys
import torch
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP this triton has no ahead-of-time compile API:", exc); sys.exit(0)
import purify_fast.kernels.weight_space as ws

def ptx(fn, signature, constexprs, warps=8, options=None):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, **(options or {})})
    except (RuntimeError, FileNotFoundError) as exc:
        if "ptxas" in str(exc).lower():
            print("SKIP no ptxas:", exc); sys.exit(0)
        raise
    return k.asm["ptx"]

def launch_options(kernel_name, call):
    # The compile options (launch keywords that are not kernel arguments) a launcher passes.
    kernel, seen = getattr(ws, kernel_name), {}
    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(kwargs)
    setattr(ws, kernel_name, Capture())
    os.environ["TRITON_INTERPRET"] = "1"  # only so that the launcher takes CPU tensors
    try:
        call()
    finally:
        setattr(ws, kernel_name, kernel)
        del os.environ["TRITON_INTERPRET"]
    return {k: v for k, v in seen.items() if k not in kernel.arg_names}

def fma_lines(t):
    # Source lines of weight_space.py that the PTX's fused multiply-adds come from.
    files = dict(re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', t))
    where, out = None, set()
    for line in t.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line)
        if m:
            where = (files.get(m.group(1), ""), int(m.group(2)))
        elif re.search(r"\bfma\.rn(\.ftz)?\.f32", line) and where and where[1] > 0:
            if where[0].endswith("weight_space.py"):
                out.add(linecache.getline(where[0], where[1]).strip())
    return sorted(out)

fisher_opts = launch_options("_fisher_kernel", lambda: ws.fisher_accumulate_(
    torch.zeros(4), torch.ones(4, dtype=torch.bfloat16)))
emb_opts = launch_options("_embedding_drift_kernel", lambda: ws.embedding_drift_scores(
    torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2), 20.0, torch.empty(2)))
score = {"pre_ptr": "*bf16", "ft_ptr": "*bf16", "h_ptr": "*fp32", "n": "i64", "eps": "fp32"}
texts = {}
for thr in ("i32", "u32", "i64"):  # keep_threshold's type follows its value
    texts["mix " + thr] = ptx(ws._mix_random_kernel, {
        "pre_ptr": "*fp16", "ft_ptr": "*fp16", "out_ptr": "*fp16", "n": "i64",
        "seed_word": "u32", "key_word": "i32", "keep_threshold": thr}, {"BLOCK": 1024}, 4)
texts["philox"] = ptx(ws._philox_kernel, {"index_ptr": "*i64", "out_ptr": "*i64", "n": "i32",
                                          "k0": "u32", "k1": "i32"}, {"BLOCK": 1024}, 4)
texts["fisher"] = ptx(ws._fisher_kernel, {"acc_ptr": "*fp32", "grad_ptr": "*bf16", "n": "i64",
                                          "scale": "fp32"}, {"BLOCK": 2048}, options=fisher_opts)
for ind in range(4):
    texts[f"hist {ind}"] = ptx(ws._histogram_kernel, {**score, "hist_ptr": "*i64",
                               "prefix": "i32"}, {"INDICATOR": ind, "LEVEL2": ind == 0,
                                                  "BLOCK": 2048})
    texts[f"select {ind}"] = ptx(ws._select_kernel, {**score, "out_ptr": "*bf16",
                                 "threshold": "fp32"}, {"INDICATOR": ind,
                                                        "TAKES_FT": ind % 2 == 0, "BLOCK": 2048})
texts["embedding"] = ptx(ws._embedding_drift_kernel, {
    "pre_ptr": "*bf16", "ft_ptr": "*bf16", "freq_ptr": "*fp32", "out_ptr": "*fp32",
    "n_rows": "i32", "c": "fp32"}, {"N_COLS": 4099, "BLOCK_R": 4, "BLOCK_C": 1024},
    options=emb_opts)
print(json.dumps({name: {"div_rn": "div.rn.f32" in t,
                         "approx_div": "div.full" in t or "div.approx" in t,
                         "ftz": bool(re.search(r"\.ftz\b", t)),
                         "fma": len(re.findall(r"\bfma\.rn(\.ftz)?\.f32", t)),
                         "fma_lines": fma_lines(t)} for name, t in texts.items()}))
"""


def test_triton_kernels_lower_for_hopper_with_ieee_division():
    """Compile every Triton kernel for sm_90 without a GPU (Triton ships ptxas). The interpreter
    accepts code the real compiler rejects, and bit-identical scores need IEEE division
    (``div.rn.f32``, not ``div.full``) with subnormals kept (no ``.ftz``). A fresh process, because
    a process that ran the interpreter has its ``triton.language`` patched."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True,
                         check=False, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    if last.startswith("SKIP"):
        pytest.skip(last[5:])
    report = json.loads(last)
    assert len(report) == 14
    for name, facts in report.items():
        assert not facts["approx_div"], name
        if name.startswith(("hist", "select")):
            assert not facts["ftz"], name
    for name in ("hist 0", "hist 2", "select 0", "select 2", "embedding"):
        assert report[name]["div_rn"], name
    # Launched as the launchers launch them, the Fisher update and the E-PUR sum of squares round
    # the product and the sum separately, like the CUDA/C++ code (an FMA would change the last
    # bit); the only FMAs left are inside the libdevice logarithm.
    assert report["fisher"]["fma"] == 0, report["fisher"]["fma_lines"]
    assert all("tl.log" in line for line in report["embedding"]["fma_lines"]), (
        report["embedding"]["fma_lines"])
