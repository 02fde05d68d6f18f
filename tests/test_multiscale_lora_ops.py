"""The MSLR op: every backend against the reference (values and gradients), the reference's
explicit backward against gradcheck in fp64, the FFT scaling matrix against torch.fft, and bad
input errors."""

import pytest
import torch

from purify_fast import backend as B
from purify_fast.ops import multiscale_lora
from purify_fast.reference import multiscale_lora as R

# fp32 atol is relative to the output scale; half types get their rounding unit.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
KERNEL_BACKENDS = [b for b in B.available("cpu") if b != "torch"]


def _inputs(m, d_in, d_out, n, r_in, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    q = n * r_in
    x = torch.randn(m, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) if bias else None
    lo = torch.randn(q, d_in, generator=g) / d_in ** 0.5
    ro = torch.randn(d_out, q, generator=g) / q ** 0.5
    scales = [1.0, 4.0, 8.0, 12.0, 16.0][:n]
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(w), cast(b), cast(lo), cast(ro), scales


def _three_way(out, ref_same, ref64, dtype, what):
    """|out − ref64| ≤ 2·|ref_same − ref64| + atol·scale (DESIGN.md three-way check)."""
    scale = ref64.abs().max().item() + 1e-12
    err = (out.double() - ref64).abs()
    bound = 2 * (ref_same.double() - ref64).abs() + ATOL[dtype] * scale
    assert bool((err <= bound).all()), (
        f"{what}: max err {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}")


@pytest.mark.parametrize("mode", R.MODES)
def test_fft_scaling_matrix_equals_torch_fft(mode):
    g = torch.Generator().manual_seed(1)
    for scales, r_in in (([1, 4, 8], 1), ([1, 2, 3], 2), ([1, 2, 4, 8, 16], 3)):
        u = torch.randn(9, len(scales) * r_in, generator=g, dtype=torch.float64)
        k = R.expand_scales(scales, r_in)
        expect = R.apply_scaling(u, k, mode)   # literal elementwise / torch.fft path
        s = R.scaling_matrix(scales, r_in, float(r_in), mode, dtype=torch.float64)
        torch.testing.assert_close(u @ s.t(), expect, rtol=1e-12, atol=1e-12)
        if mode == "fft":
            assert torch.allclose(s, s.t()), "the FFT scaling matrix must be symmetric"
            # A non-constant K really mixes rank coordinates (not a disguised diagonal).
            assert s.diag().abs().sum() < s.abs().sum()


def test_fft_scaling_pairs_conjugate_frequencies():
    """What the docs say of FFT scaling: the real part leaves frequency m the mean of K_m and
    K_{q-m}, so BERT's eight scales with r_in 1 become 1 and seven times 16."""
    for scales, r_in in (([1, 4, 8, 12, 16, 20, 24, 28], 1), ([1, 2, 3, 4], 1), ([1, 2, 4], 2)):
        k = R.expand_scales(scales, r_in).double()
        q = k.numel()
        s = R.scaling_matrix(scales, r_in, float(r_in), "fft", dtype=torch.float64)
        spectrum = torch.fft.fft(s[:, 0]).real  # a circulant matrix's eigenvalues
        paired = (k + k[(-torch.arange(q)) % q]) / 2
        torch.testing.assert_close(spectrum, paired, rtol=1e-12, atol=1e-12)
    s = R.scaling_matrix([1, 4, 8, 12, 16, 20, 24, 28], 1, 1.0, "fft", dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.eigvalsh(s),
                               torch.tensor([1.0] + [16.0] * 7, dtype=torch.float64))


@pytest.mark.parametrize("mode", R.MODES)
def test_reference_backward_gradcheck_fp64(mode):
    x, w, b, lo, ro, sc = _inputs(5, 7, 6, 3, 2, torch.float64)
    x.requires_grad_()
    lo.requires_grad_()
    ro.requires_grad_()
    fn = lambda x_, l_, r_: multiscale_lora(x_, w, b, l_, r_, sc, 6.0, mode=mode,
                                            backend="torch")
    assert torch.autograd.gradcheck(fn, (x, lo, ro), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", R.MODES)
def test_reference_matches_dense_formulation(mode):
    x, w, b, lo, ro, sc = _inputs(11, 13, 9, 3, 1, torch.float64)
    y = R.multiscale_lora(x, w, b, lo, ro, sc, 6.0, mode)
    dense = torch.nn.functional.linear(x, R.merged_weight(w, lo, ro, sc, 6.0, mode), b)
    torch.testing.assert_close(y, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 123, 45, 3, 1, True), (37, 64, 17, 2, 3, False)])
def test_kernels_three_way(backend, mode, dtype, shape):
    m, d_in, d_out, n, r_in, bias = shape
    x, w, b, lo, ro, sc = _inputs(m, d_in, d_out, n, r_in, dtype, seed=hash(shape) % 1000,
                                  bias=bias)
    alpha = 6.0
    xs, ls, rs = (t.clone().requires_grad_() for t in (x, lo, ro))
    y = multiscale_lora(xs, w, b, ls, rs, sc, alpha, mode=mode, backend=backend)
    assert y.dtype == dtype and y.shape == (m, d_out)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(gy)

    d = lambda t: None if t is None else t.double()
    y64 = R.multiscale_lora(d(x), d(w), d(b), d(lo), d(ro), sc, alpha, mode)
    y_same = R.multiscale_lora(x, w, b, lo, ro, sc, alpha, mode)
    _three_way(y, y_same, y64, dtype, f"{backend} y")

    g64 = R.multiscale_lora_backward(gy.double(), d(x), d(w), d(lo), d(ro), sc, alpha, mode)
    g_same = R.multiscale_lora_backward(gy, x, w, lo, ro, sc, alpha, mode)
    for name, got, same, ref64 in zip(("dx", "dL", "dR"), (xs.grad, ls.grad, rs.grad), g_same,
                                      g64):
        assert got.dtype == dtype
        _three_way(got, same, ref64, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_non_contiguous_and_batched_input(backend):
    x, w, b, lo, ro, sc = _inputs(12, 40, 24, 4, 1, torch.float32)
    # Non-contiguous x with a leading batch dimension; a transposed (non-contiguous) weight view.
    x3 = x.t().contiguous().t().reshape(3, 4, 40)
    wt = w.t().contiguous().t()
    y = multiscale_lora(x3, wt, b, lo, ro, sc, 6.0, mode="fft", backend=backend)
    ref = R.multiscale_lora(x, w, b, lo, ro, sc, 6.0, "fft").reshape(3, 4, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_backward_with_transposed_input(backend):
    """x as a transposed or permuted view that needs grad: dx comes back dense and right (the
    C++ kernel refused to write into a gradient buffer with x's transposed strides)."""
    x, w, b, lo, ro, sc = _inputs(12, 40, 24, 4, 1, torch.float32)
    for view in (lambda t: t.t().contiguous().t(),
                 lambda t: t.reshape(3, 4, 40).permute(2, 0, 1).contiguous().permute(1, 2, 0)):
        xv = view(x).detach().requires_grad_(True)
        assert not xv.is_contiguous()
        multiscale_lora(xv, w, b, lo, ro, sc, 6.0, mode="fft", backend=backend).sum().backward()
        xr = x.detach().reshape(xv.shape).requires_grad_(True)
        R.multiscale_lora(xr.reshape(12, 40), w, b, lo, ro, sc, 6.0, "fft").sum().backward()
        torch.testing.assert_close(xv.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_auto_backend_and_fp64_fall_back_to_torch():
    x, w, b, lo, ro, sc = _inputs(3, 8, 5, 2, 1, torch.float64)
    y = multiscale_lora(x, w, b, lo, ro, sc, 6.0)
    torch.testing.assert_close(y, R.multiscale_lora(x, w, b, lo, ro, sc, 6.0, "radial"))
    if KERNEL_BACKENDS:
        with pytest.raises(TypeError, match="backend='torch'"):
            multiscale_lora(x, w, b, lo, ro, sc, 6.0, backend=KERNEL_BACKENDS[0])


def test_bad_inputs_raise_clear_errors():
    x, w, b, lo, ro, sc = _inputs(4, 8, 6, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="scales is empty"):
        multiscale_lora(x, w, b, lo, ro, [], 6.0)
    with pytest.raises(ValueError, match="positive"):
        multiscale_lora(x, w, b, lo, ro, [1.0, -2.0], 6.0)
    with pytest.raises(ValueError, match="positive"):
        multiscale_lora(x, w, b, lo, ro, [1.0, 0.0], 6.0)
    with pytest.raises(ValueError, match="multiple of the 3 scales"):
        multiscale_lora(x, w, b, lo, ro, [1.0, 2.0, 3.0], 6.0)
    with pytest.raises(ValueError, match="lora_r must be"):
        multiscale_lora(x, w, b, lo, ro[:, :1], sc, 6.0)
    with pytest.raises(ValueError, match="lora_l must be"):
        multiscale_lora(x, w, b, lo[:, :5], ro, sc, 6.0)
    with pytest.raises(ValueError, match="last dimension"):
        multiscale_lora(x[:, :5], w, b, lo, ro, sc, 6.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        multiscale_lora(x, w, b[:3], lo, ro, sc, 6.0)
    with pytest.raises(TypeError, match="lora_l dtype"):
        multiscale_lora(x, w, b, lo.half(), ro, sc, 6.0)
    with pytest.raises(ValueError, match="mode must be"):
        multiscale_lora(x, w, b, lo, ro, sc, 6.0, mode="wavelet")
    with pytest.raises(ValueError, match="frozen"):
        multiscale_lora(x, w.clone().requires_grad_(), b, lo, ro, sc, 6.0)
    with pytest.raises(ValueError, match="backend must be"):
        multiscale_lora(x, w, b, lo, ro, sc, 6.0, backend="fortran")
