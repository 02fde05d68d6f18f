"""The MSLR op: every backend against the reference (values and gradients), the reference's
explicit backward against gradcheck in fp64, the FFT scaling matrix against torch.fft, and bad
input errors."""

import os
import subprocess
import sys

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


@pytest.mark.parametrize("backend", B.available("cpu"))
def test_strided_and_expanded_bias(backend):
    """A sliced (stride 2) and an expanded (stride 0) bias give the dense bias's output (the Triton
    kernel once read the bias as if it were dense)."""
    x, w, _, lo, ro, sc = _inputs(9, 24, 70, 2, 1, torch.float32)
    base = torch.randn(2 * 70, generator=torch.Generator().manual_seed(3))
    for b in (base[::2], torch.tensor([5.0]).expand(70)):
        assert not b.is_contiguous()
        y = multiscale_lora(x, w, b, lo, ro, sc, 6.0, mode="fft", backend=backend)
        ref = R.multiscale_lora(x, w, b.contiguous(), lo, ro, sc, 6.0, "fft")
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# Views whose element offsets pass 2**31 while every stride stays below it, so int32 index·stride
# products would wrap. The 4 GiB buffer is virtual: only the pages written here become memory.
_BIG_OFFSETS = r"""
import sys
import torch
from purify_fast.kernels import multiscale_lora as K

try:
    big = torch.empty(2**31 + 64, dtype=torch.float16)
except RuntimeError:
    print("SKIP: cannot reserve a 4 GiB buffer")
    sys.exit(0)
g = torch.Generator().manual_seed(0)
def view(shape, stride, offset):
    t = big.as_strided(shape, stride, offset)
    t.copy_(torch.randn(shape, generator=g).half())
    return t
S = 2**30
x = view((3, 3), (S, 1), 0)        # row 2 at 2**31 (row index · stride)
xt = view((2, 3), (1, S), 8)       # column 2 at 2**31 (k index · stride)
lt = view((2, 3), (1, S), 16)      # lora_l [Q, K], k index · stride
w = view((3, 3), (S, 1), 24)       # weight row 2 at 2**31
r = view((3, 2), (S, 1), 32)       # lora_r row 2 at 2**31
s = torch.eye(2) * 0.5
worst = 0.0
for xx in (x, xt):
    v = torch.empty(xx.shape[0], 2)
    K.mslora_project(xx, lt, s, v)
    ref_v = xx.float() @ lt.float().t() @ s.t()
    worst = max(worst, float((v - ref_v).abs().max()))
    y = torch.empty(xx.shape[0], 3, dtype=torch.float16)
    K.mslora_linear(xx, w, None, v, r, y)
    ref_y = xx.float() @ w.float().t() + v @ r.float().t()
    worst = max(worst, float((y.float() - ref_y).abs().max()) / 10)
print("worst", worst)
sys.exit(0 if worst < 1e-3 else 1)
"""


@pytest.mark.skipif("triton" not in B.available("cpu"), reason="needs the Triton interpreter")
def test_triton_offsets_past_2_pow_31(tmp_path):
    """Row, column and k offsets beyond 2**31 elements address the right memory (int64 indices).
    In a child process: a wrapped offset reads outside the buffer and may crash."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _BIG_OFFSETS], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def test_auto_backend_skips_a_backend_the_call_does_not_fit(monkeypatch):
    """resolve(skip=...): "auto" passes over a backend whose kernels refuse the call's shape (the
    MSLR CUDA kernels take n·r_in <= 64) and an explicit name still reaches it."""
    fake = (object(), "")
    monkeypatch.setattr(B, "_cuda", lambda: fake)
    monkeypatch.setattr(B, "_triton", lambda: fake)
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    assert B.resolve(None, cuda, torch.float32) == "cuda"
    assert B.resolve("auto", cuda, torch.float32, skip=("cuda",)) == "triton"
    assert B.resolve(None, cuda, torch.float16, skip=("cuda", "triton")) == "torch"
    assert B.resolve("cuda", cuda, torch.float32, skip=("cuda",)) == "cuda"
    # the op asks to skip cuda exactly when the rank n·r_in passes 64
    seen = []
    real = B.resolve

    def spy(backend, device, dtype=None, *, skip=()):
        seen.append(skip)
        return real(backend, device, dtype, skip=skip)
    monkeypatch.setattr(B, "resolve", spy)
    for r_in in (64, 65):  # one scale: the rank is r_in
        x, w, b, lo, ro, sc = _inputs(3, 8, 5, 1, r_in, torch.float32)
        multiscale_lora(x, w, b, lo, ro, sc, 6.0)
    assert seen == [(), ("cuda",)]


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


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_refuse_second_derivatives_and_keep_first_order(backend):
    """A gradient penalty (create_graph=True, then a backward through the gradient) was silently
    wrong on cpp (its backward's GEMMs recorded part of a graph: 28540 for 292429) and failed
    obscurely on triton. The kernel backends are first order only: a second backward raises,
    naming backend='torch', and first-order gradients are unchanged with or without
    create_graph."""
    x0, w, b, lo0, ro0, sc = _inputs(4, 6, 5, 2, 2, torch.float32, seed=7)

    def grads(create_graph, loss_of, wrt):
        x, lo, ro = (t.clone().requires_grad_() for t in (x0, lo0, ro0))
        y = multiscale_lora(x, w, b, lo, ro, sc, 2.0, backend=backend)
        inputs = {"x": x, "l": lo, "r": ro}
        return torch.autograd.grad(loss_of(y), [inputs[k] for k in wrt],
                                   create_graph=create_graph), inputs

    for loss_of in (lambda y: y.square().sum(), lambda y: y.sum()):   # grad_y with / without graph
        plain, _ = grads(False, loss_of, "xlr")
        graphed, inputs = grads(True, loss_of, "xlr")
        for p_, g_ in zip(plain, graphed):
            assert torch.equal(p_, g_.detach())
        penalty = sum(g.square().sum() for g in graphed)
        with pytest.raises(RuntimeError, match=f"on the '{backend}' backend is differentiable "
                                               f"once only.*use backend='torch'"):
            torch.autograd.grad(penalty, inputs["l"])
        only_x, inputs = grads(True, loss_of, "x")                    # one gradient asked for
        assert torch.equal(only_x[0].detach(), plain[0])
        with pytest.raises(RuntimeError, match="use backend='torch' for second derivatives"):
            only_x[0].square().sum().backward()
    # the torch backend differentiates twice, matching fp64 autograd through the reference
    x, lo = x0.double().requires_grad_(), lo0.double().requires_grad_()
    y = multiscale_lora(x, w.double(), b.double(), lo, ro0.double(), sc, 2.0, backend="torch")
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    got, = torch.autograd.grad(gx.square().sum(), lo)
    x, lo = x0.double().requires_grad_(), lo0.double().requires_grad_()
    y = R.multiscale_lora(x, w.double(), b.double(), lo, ro0.double(), sc, 2.0, "radial")
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    want, = torch.autograd.grad(gx.square().sum(), lo)
    torch.testing.assert_close(got, want)
    doc = " ".join(multiscale_lora.__doc__.split())
    assert "first order only on the kernel backends" in doc
