"""MIMIC attention-map loss: every available backend against the fp64 reference (values and
gradients), odd shapes, every dtype, padding masks, CNN maps, bad input."""

import zlib

import pytest
import torch

from purify_fast import backend as B
from purify_fast.ops import attention_maps as ops
from purify_fast.reference import attention_maps as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()

ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _backends(device):
    return B.available(device)


def _case(shape_s, shape_t, dtype, device, seed, masked=True):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(*shape_s, generator=g).to(device=device, dtype=dtype)
    ft = torch.randn(*shape_t, generator=g).to(device=device, dtype=dtype)
    mask = None
    if masked:
        b, n = shape_s[:2]
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        lengths[0] = n  # one row without padding
        mask = (torch.arange(n)[None, :] < lengths[:, None]).to(device)
    return fs, ft, mask


def _ref64(fss, fts, weights, mask):
    """Loss and gradients of the reference in fp64 on the same (already rounded) inputs."""
    xs = [f.detach().double().requires_grad_(True) for f in fss]
    ys = [f.detach().double().requires_grad_(True) for f in fts]
    loss = sum(w * ref.attention_row_loss(x, y, mask).double().sum() /
               (mask.sum().double() if mask is not None else x.shape[0] * x.shape[1])
               for x, y, w in zip(xs, ys, weights))
    gx = torch.autograd.grad(loss, xs + ys)
    return loss.detach(), gx


def _close(out, want, same_dtype, dtype, what):
    """|out − ref64| ≤ 2·|ref_same_dtype − ref64| + atol (the three-way check)."""
    out, want, same_dtype = out.double().cpu(), want.double().cpu(), same_dtype.double().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    bound = 2 * (same_dtype - want).abs() + ATOL[dtype] * scale
    err = (out - want).abs()
    assert bool((err <= bound).all()), (
        f"{what}: max err {float(err.max()):.3e} vs bound {float(bound.max()):.3e} "
        f"(scale {float(scale):.3e})")


SHAPES = [  # (student [B, N, C_S], teacher [B, N, C_T]): odd sizes, channel counts that differ
    ((5, 37, 45), (5, 37, 70)),
    ((3, 1, 300), (3, 1, 123)),
    ((2, 129, 7), (2, 129, 7)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" + str(s[1][2]))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_loss_and_gradients_match_reference(device, dtype, shapes, masked):
    seed = zlib.crc32(repr((shapes, masked, str(dtype))).encode())
    layers = [_case(*shapes, dtype, device, seed + i, masked) for i in range(2)]
    mask = layers[0][2]
    fss = [fs for fs, _, _ in layers]
    fts = [ft for _, ft, _ in layers]
    weights = [1000.0 + 10000 * 0.3, 1000.0 + 10000 * 0.7]
    want, want_grads = _ref64(fss, fts, weights, mask)
    # Reference in the inputs' own dtype: the rounding any backend is allowed (times two).
    xs = [f.detach().clone().requires_grad_(True) for f in fss]
    ys = [f.detach().clone().requires_grad_(True) for f in fts]
    same = ops.attention_map_loss(xs, ys, weights, mask, backend="torch")
    same_grads = torch.autograd.grad(same, xs + ys)
    for name in _backends(device):
        xs = [f.detach().clone().requires_grad_(True) for f in fss]
        ys = [f.detach().clone().requires_grad_(True) for f in fts]
        out = ops.attention_map_loss(xs, ys, weights, mask, backend=name)
        assert out.dtype == torch.float32 and out.dim() == 0
        grads = torch.autograd.grad(out, xs + ys)
        _close(out.detach(), want, same.detach(), torch.float32, f"{name} loss")
        for i, (g, w, s) in enumerate(zip(grads, want_grads, same_grads)):
            assert g.dtype == dtype and g.shape == (xs + ys)[i].shape
            assert bool(torch.isfinite(g).all())
            _close(g, w, s, dtype, f"{name} grad[{i}]")
            if mask is not None:  # padding gets no gradient at all
                assert bool((g.float().abs().sum(-1)[~mask.bool()] == 0).all())


def test_gradients_only_for_inputs_that_need_them_and_teacher_untouched(device):
    fs, ft, mask = _case((4, 19, 33), (4, 19, 21), torch.float32, device, 7)
    for name in _backends(device):
        x = fs.clone().requires_grad_(True)
        before = ft.clone()
        loss = ops.attention_map_loss(x, ft, [2.0], mask, backend=name)
        loss.backward()
        assert x.grad is not None and ft.grad is None
        assert torch.equal(ft, before)


def test_noncontiguous_and_cnn_maps(device):
    g = torch.Generator().manual_seed(3)
    # Token maps given as transposed views.
    fs = torch.randn(3, 40, 11, generator=g).to(device).transpose(1, 2)  # [3, 11, 40]
    ft = torch.randn(3, 24, 11, generator=g).to(device).transpose(1, 2)
    # CNN maps [B, C, H, W]: positions are H·W.
    cs = torch.randn(2, 6, 5, 7, generator=g).to(device)
    ct = torch.randn(2, 9, 5, 7, generator=g).to(device)
    want_tok = ref.attention_layer_mse(fs.double(), ft.double())
    want_cnn = ref.attention_layer_mse(cs.double().flatten(2).transpose(1, 2),
                                       ct.double().flatten(2).transpose(1, 2))
    for name in _backends(device):
        x = fs.clone().requires_grad_(True)
        tok = ops.attention_layer_mse(x, ft, backend=name)
        tok.backward()
        assert x.grad.shape == x.shape
        torch.testing.assert_close(tok.double().cpu(), want_tok.cpu(), rtol=1e-5, atol=1e-9)
        y = cs.clone().requires_grad_(True)
        cnn = ops.attention_layer_mse(y, ct, backend=name)
        cnn.backward()
        assert y.grad.shape == cs.shape
        torch.testing.assert_close(cnn.double().cpu(), want_cnn.cpu(), rtol=1e-5, atol=1e-9)
        # Same gradient as autograd through the reference.
        y64 = cs.double().requires_grad_(True)
        ref.attention_layer_mse(y64.flatten(2).transpose(1, 2),
                                ct.double().flatten(2).transpose(1, 2)).backward()
        torch.testing.assert_close(y.grad.double().cpu(), y64.grad.cpu(), rtol=1e-4, atol=1e-10)


def test_degenerate_rows_stay_finite(device):
    # A fully padded row and an all-zero student row: both maps are zero there, no NaN anywhere.
    fs = torch.randn(3, 8, 5, device=device)
    ft = torch.randn(3, 8, 6, device=device)
    fs[1] = 0
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[2] = False
    for name in _backends(device):
        x = fs.clone().requires_grad_(True)
        loss = ops.attention_map_loss(x, ft, [1.0], mask, backend=name)
        loss.backward()
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all())
        # Row 1: a zero map against a unit one costs exactly 1 over the 16 real positions.
        want = ref.attention_map_loss([fs.double()], [ft.double()], [1.0], mask)
        torch.testing.assert_close(loss.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-9)


def test_identical_maps_give_zero_loss_and_zero_grad(device):
    f = torch.randn(2, 13, 17, device=device)
    for name in _backends(device):
        x = f.clone().requires_grad_(True)
        loss = ops.attention_map_loss([x], [f * 3.0], [5.0], backend=name)  # scale-invariant
        loss.backward()
        assert float(loss.detach()) < 1e-10
        assert float(x.grad.abs().max()) < 1e-6


def test_fp64_runs_on_torch_and_named_kernels_refuse_it():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ops.attention_map_loss(a, y, [3.0]).double(), (x,))
    if "cpp" in B.available("cpu"):
        with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
            ops.attention_map_loss(x, y, [1.0], backend="cpp")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(student_feats=[], teacher_feats=[]), ValueError, "student_feats is empty"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 6, 3)]),
     ValueError, "positions"),
    (dict(student_feats=[torch.randn(2, 5, 3)] * 2, teacher_feats=[torch.randn(2, 5, 3)]),
     ValueError, "teacher_feats has 1"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          weights=[1.0, 2.0]), ValueError, "weights has 2"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          mask=torch.ones(2, 4)), ValueError, r"mask must have shape \(2, 5\)"),
    (dict(student_feats=[torch.randn(2, 5)], teacher_feats=[torch.randn(2, 5)]),
     ValueError, "student_feats\\[0\\] must be"),
    (dict(student_feats=[torch.randn(2, 0, 3)], teacher_feats=[torch.randn(2, 0, 3)]),
     ValueError, r"student_feats\[0\] is empty"),
    (dict(student_feats=[torch.randn(2, 3, 0, 0)], teacher_feats=[torch.randn(2, 3, 0, 0)]),
     ValueError, r"student_feats\[0\] is empty \(shape \(2, 3, 0, 0\)\)"),
    (dict(student_feats=[torch.ones(2, 5, 3, dtype=torch.int64)],
          teacher_feats=[torch.randn(2, 5, 3)]), TypeError, "floating-point"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          weights=[float("nan")]), ValueError, "weights must be finite"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          weights=1.0), TypeError, "weights must be a sequence of floats"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          eps=0.0), ValueError, "eps must be"),
    (dict(student_feats=[torch.randn(2, 5, 3)], teacher_feats=[torch.randn(2, 5, 3)],
          backend="nope"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.attention_map_loss(**kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: every backend can run")
def test_cuda_backend_by_name_explains_the_fix():
    with pytest.raises(B.BackendUnavailable, match="fix:"):
        ops.attention_map_loss(torch.randn(2, 5, 3), torch.randn(2, 5, 3), backend="cuda")


def test_loss_dtype_is_fp32_or_fp64_for_fp64_maps_as_documented():
    """The docstrings said "(fp32 scalar)"; fp64 maps (gradchecks) give an fp64 loss on the torch
    backend, half and fp32 maps an fp32 one on every backend."""
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 4, generator=g)
    for backend in B.available("cpu"):
        for dtype in DTYPES:
            loss = ops.attention_map_loss(fs.to(dtype), ft.to(dtype), backend=backend)
            assert loss.dtype == torch.float32 and loss.dim() == 0, (backend, dtype)
    assert ops.attention_layer_mse(fs.double(), ft.double()).dtype == torch.float64
    assert ops.attention_map_loss([fs.double()], [ft], [2.0]).dtype == torch.float64
    for fn in (ops.attention_layer_mse, ops.attention_map_loss):
        doc = " ".join(fn.__doc__.split())
        assert "(fp32 scalar" not in doc and "fp64 when" in doc, fn.__name__


KERNEL_BACKENDS = [b for b in B.available("cpu") if b != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["tokens", "cnn"])
def test_kernel_backends_refuse_second_derivatives_and_keep_first_order(backend, layout):
    """A gradient penalty (create_graph=True, then a backward through the gradient) got a
    gradient with no graph from the kernel backward: the second backward failed with PyTorch's
    "does not require grad" or, with another term in the penalty, silently dropped this op's part.
    The kernel backends are first order only: a second backward raises, naming backend='torch';
    first-order gradients are unchanged with or without create_graph."""
    g = torch.Generator().manual_seed(11)
    if layout == "tokens":  # mask, plus a transposed (non-contiguous) student view
        s0 = torch.randn(3, 5, 7, generator=g).transpose(1, 2)              # [3, 7, 5]
        t0 = torch.randn(3, 7, 4, generator=g)
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]], dtype=torch.bool)
    else:  # [B, C, H, W]: the op sees a reshaped, transposed view of the map
        s0, t0, mask = torch.randn(2, 3, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g), None

    def grads(create_graph, loss_of, teacher_grad):
        x = s0.clone().requires_grad_()
        y = t0.clone().requires_grad_(teacher_grad)
        loss = ops.attention_map_loss([x, x * 2.0], [y, y], [3.0, 0.5], mask, backend=backend)
        wrt = [x, y] if teacher_grad else [x]
        return torch.autograd.grad(loss_of(loss), wrt, create_graph=create_graph), wrt

    for loss_of in (lambda l: l, lambda l: l.square()):   # upstream gradient without / with graph
        for teacher_grad in (False, True):
            plain, _ = grads(False, loss_of, teacher_grad)
            assert all(p.grad_fn is None and not p.requires_grad for p in plain)
            graphed, wrt = grads(True, loss_of, teacher_grad)
            for p, q in zip(plain, graphed):
                assert torch.equal(p, q.detach())
            penalty = sum(q.square().sum() for q in graphed)
            with pytest.raises(RuntimeError, match=f"attention_map_loss on the '{backend}' backend "
                                                   f"is differentiable once only.*use "
                                                   f"backend='torch'"):
                torch.autograd.grad(penalty, wrt[-1])
    # A penalty with another, torch-differentiable term must not drop this op's part silently.
    (gx,), (x,) = grads(True, lambda l: l, False)
    with pytest.raises(RuntimeError, match="use backend='torch' for second derivatives"):
        (gx.square().sum() + x.square().sum()).backward()
    # A second backward that does not reach the op's inputs still works.
    (gx,), (x,) = grads(True, lambda l: l, False)
    z = torch.tensor(2.0, requires_grad=True)
    dz, = torch.autograd.grad(gx.sum() * 0 + z * z, z)
    assert float(dz) == 4.0


def test_torch_backend_differentiates_twice():
    """The reference backend keeps higher-order gradients (gradgradcheck in fp64, odd shapes, a
    mask, two layers with different channel counts, both maps differentiable); fp32 on the torch
    backend differentiates twice too."""
    g = torch.Generator().manual_seed(12)
    fs = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    ft = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for backend in ("torch", None):  # fp64 under auto runs on torch as well
        def fn(a, b, t, backend=backend):
            return ops.attention_map_loss([a, b], [t, t], [2.0, 0.7], mask, backend=backend)
        assert torch.autograd.gradgradcheck(fn, (*fs, ft))
    x = fs[0].detach().float().requires_grad_()
    gx, = torch.autograd.grad(ops.attention_layer_mse(x, ft.detach().float(), mask, backend="torch"),
                              x, create_graph=True)
    hx, = torch.autograd.grad(gx.square().sum(), x)
    assert bool(torch.isfinite(hx).all()) and float(hx.abs().max()) > 0
    doc = " ".join(ops.attention_map_loss.__doc__.split())
    assert "first order only on the kernel backends" in doc
