"""The multi-scale LoRA (MSLR) linear op of MuScleLoRA:
``y = x·Wᵀ + b + (α/r_in)·scale(x·Lᵀ)·Rᵀ`` with ``scale`` radial (``⊙ K``) or in the frequency
domain of the rank axis (``Re(IFFT(K ⊙ FFT(·)))``). Math, shapes and backward formulas:
:mod:`purify_fast.reference.multiscale_lora`.

Every kernel backend module implements this contract on 2-D tensors (any strides unless said):

=====================================================================  ===========================
``mslora_project(x[M,K], l[Q,K], s[Q,Q] fp32, out[M,Q] fp32)``          ``out = (x·lᵀ)·sᵀ``
``mslora_linear(x[M,K], w[N,K], b[N]|None, v[M,Q] fp32, r[N,Q], out)``  ``out = x·wᵀ + b + v·rᵀ``
=====================================================================  ===========================

``s`` is ``(α/r_in)·S`` from :func:`purify_fast.reference.multiscale_lora.scaling_matrix`, so one
pair of kernels serves both modes, and the backward is the same two launches on transposed views
plus two thin GEMMs (see ``purify_fast.kernels.multiscale_lora``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from purify_fast import backend as _backend
from purify_fast.ops._first_order import first_order_only
from purify_fast.reference import multiscale_lora as ref

MODES = ref.MODES


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def normalize_scales(scales) -> tuple[float, ...]:
    """The scales as a tuple of positive finite floats (raises a clear error otherwise)."""
    if isinstance(scales, torch.Tensor):
        values = scales.detach().reshape(-1).tolist()
    elif isinstance(scales, (int, float)):
        values = [scales]
    elif isinstance(scales, (str, bytes)):  # "124" would read as the scales 1, 2, 4
        raise TypeError(f"scales must be a sequence of positive numbers, got the string {scales!r}")
    else:
        try:
            values = [float(s) for s in scales]
        except (TypeError, ValueError):
            raise TypeError(f"scales must be a sequence of positive numbers, got {scales!r}") from None
    if len(values) == 0:
        raise ValueError("scales is empty: give at least one positive scale, e.g. [1, 2, 4]")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"scales must all be positive and finite; got {bad} in {values}")
    return tuple(float(s) for s in values)


@lru_cache(maxsize=64)
def _scaling_matrix_cached(scales: tuple[float, ...], r_in: int, alpha: float, mode: str,
                           device: torch.device) -> torch.Tensor:
    # Cached so a training step does not rebuild (and re-upload) the tiny Q×Q matrix per call.
    return ref.scaling_matrix(scales, r_in, alpha, mode, device=device)


def _validate(x, weight, bias, lora_l, lora_r, scales, alpha, mode):
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    _check_tensor(lora_l, "lora_l")
    _check_tensor(lora_r, "lora_r")
    if bias is not None:
        _check_tensor(bias, "bias")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scales = normalize_scales(scales)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x's last dimension must be d_in={d_in} (weight is {tuple(weight.shape)}); "
                         f"got x of shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if lora_l.dim() != 2 or lora_l.shape[1] != d_in:
        raise ValueError(f"lora_l must be [n·r_in, d_in={d_in}], got {tuple(lora_l.shape)}")
    q = lora_l.shape[0]
    if lora_r.dim() != 2 or tuple(lora_r.shape) != (d_out, q):
        raise ValueError(f"lora_r must be [d_out={d_out}, n·r_in={q}] to match weight and lora_l, "
                         f"got {tuple(lora_r.shape)}")
    n = len(scales)
    if q == 0 or q % n != 0:
        raise ValueError(f"lora_l has {q} rank rows, which is not a positive multiple of the "
                         f"{n} scales (rank rows must equal n_scales·r_in)")
    named = [("x", x), ("weight", weight), ("lora_l", lora_l), ("lora_r", lora_r)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("weight and bias are frozen in this op (no gradient is computed for them); "
                         "set requires_grad=False on them, or detach them")
    return scales, alpha, q // n


class _ReferenceFn(torch.autograd.Function):
    """The reference forward and its explicit backward (so gradcheck tests the formulas)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_l, lora_r, scales, alpha, mode):
        ctx.save_for_backward(x2d, weight, lora_l, lora_r)
        ctx.cfg = (scales, alpha, mode)
        return ref.multiscale_lora(x2d, weight, bias, lora_l, lora_r, scales, alpha, mode)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_l, lora_r = ctx.saved_tensors
        gx, gl, gr = ref.multiscale_lora_backward(grad_y, x2d, weight, lora_l, lora_r, *ctx.cfg)
        return gx, None, None, gl, gr, None, None, None


class _KernelFn(torch.autograd.Function):
    """Two kernel launches forward; two launches plus two thin GEMMs backward. First order only:
    a second backward through it raises (:func:`first_order_only`)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_l, lora_r, s, name):
        kern = _backend.module(name)
        m, q, d_out = x2d.shape[0], lora_l.shape[0], weight.shape[0]
        v = torch.empty((m, q), dtype=torch.float32, device=x2d.device)
        kern.mslora_project(x2d, lora_l, s, v)
        y = torch.empty((m, d_out), dtype=x2d.dtype, device=x2d.device)
        kern.mslora_linear(x2d, weight, bias, v, lora_r, y)
        ctx.save_for_backward(x2d, weight, lora_l, lora_r, s, v)
        ctx.name = name
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_l, lora_r, s, v = ctx.saved_tensors
        with torch.no_grad():  # under create_graph=True the GEMMs would record a partial graph
            grads = _KernelFn._grads(ctx, grad_y, x2d, weight, lora_l, lora_r, s, v)
        gx, gl, gr = first_order_only("multiscale_lora", ctx.name, grads,
                                      (grad_y, x2d, lora_l, lora_r))
        return gx, None, None, gl, gr, None, None

    @staticmethod
    def _grads(ctx, grad_y, x2d, weight, lora_l, lora_r, s, v):
        need_x, _, _, need_l, need_r = ctx.needs_input_grad[:5]
        kern = _backend.module(ctx.name)
        g = grad_y.contiguous()
        gx = gl = gr = None
        if need_x or need_l:
            d = torch.empty((g.shape[0], s.shape[0]), dtype=torch.float32, device=g.device)
            kern.mslora_project(g, lora_r.t(), s.t(), d)       # du = (g·R)·S
            if need_x:
                # Contiguous whatever x's strides (a transposed x gives a transposed x2d): the
                # kernel writes a dense row-major [M, d_in] result.
                gx = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
                kern.mslora_linear(g, weight.t(), None, d, lora_l.t(), gx)
            if need_l:
                # du rounded once to the activation dtype, as any half-precision LoRA backward does.
                gl = (d.to(x2d.dtype).t() @ x2d).to(lora_l.dtype)
        if need_r:
            gr = (g.t() @ v.to(g.dtype)).to(lora_r.dtype)
        return gx, gl, gr


def multiscale_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_l: torch.Tensor, lora_r: torch.Tensor,
                    scales: Sequence[float] | torch.Tensor, alpha: float, *,
                    mode: str = "radial", backend: str | None = None) -> torch.Tensor:
    """``y = x·Wᵀ + b + (α/r_in)·scale(x·Lᵀ)·Rᵀ`` for ``x [..., d_in]``, differentiable in ``x``,
    ``lora_l`` and ``lora_r`` (``weight`` and ``bias`` are frozen): to any order on the ``torch``
    backend, to first order only on the kernel backends (``cpp``, ``triton``, ``cuda``), where a
    second backward (``create_graph=True``, e.g. a gradient penalty) raises an error naming
    ``backend='torch'``.

    ``weight [d_out, d_in]``, ``bias [d_out]`` or None, ``lora_l [n·r_in, d_in]``,
    ``lora_r [d_out, n·r_in]``, ``scales``: the ``n`` positive scales ``k_i`` (``K`` repeats each
    ``r_in`` times). ``mode="radial"`` multiplies the rank vector by ``K``; ``mode="fft"`` applies
    ``K`` in its discrete Fourier domain. The dense ``R·diag(K)·L`` is never formed. All tensors
    share one dtype and device; fp32 accumulation inside every backend.
    """
    scales, alpha, r_in = _validate(x, weight, bias, lora_l, lora_r, scales, alpha, mode)
    # The CUDA kernels hold a row's rank vector in registers: n·r_in <= 64
    # (csrc/multiscale_lora_cuda_binding.cpp); "auto" passes over them for a larger rank.
    name = _backend.resolve(backend, x.device, x.dtype,
                            skip=("cuda",) if lora_l.shape[0] > 64 else ())
    x2d = x.reshape(-1, x.shape[-1])
    if name == "torch":
        y = _ReferenceFn.apply(x2d, weight, bias, lora_l, lora_r, scales, alpha, mode)
    else:
        s = _scaling_matrix_cached(scales, r_in, alpha, mode, x.device)
        y = _KernelFn.apply(x2d, weight, bias, lora_l, lora_r, s, name)
    return y.reshape(*x.shape[:-1], weight.shape[0])
