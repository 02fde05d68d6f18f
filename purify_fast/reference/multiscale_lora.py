"""Readable PyTorch reference of the multi-scale LoRA (MSLR) linear op of MuScleLoRA.

Shapes: ``x [M, d_in]``, ``W [d_out, d_in]``, ``b [d_out]`` (or None), ``L [q, d_in]``,
``R [d_out, q]`` with ``q = n·r_in`` for ``n`` scales; ``K ∈ R^q`` is each scale repeated ``r_in``
times (scale i owns rank rows ``i·r_in .. (i+1)·r_in−1``). With ``u = x·Lᵀ ∈ R^{M×q}``::

    radial:  v = u ⊙ K
    fft:     v = Re(IFFT_q(K ⊙ FFT_q(u)))          (transforms along the rank axis, in fp32)
    y = x·Wᵀ + b + (α / r_in) · v·Rᵀ

Both scalings are linear maps of the rank vector, ``v = u·Sᵀ`` for a fixed real ``q×q`` matrix:
``S = diag(K)`` (radial) and, for real ``u``,
``S = Re(F⁻¹ diag(K) F)``, i.e. ``S[j,k] = (1/q) Σ_m K_m cos(2π m (j−k) / q)``: a symmetric
circulant matrix (the imaginary part of ``F⁻¹ diag(K) F`` only ever multiplies ``u``'s zero
imaginary part, so taking the real part of the matrix equals taking it of the product).
:func:`scaling_matrix` returns ``(α/r_in)·S``; the kernels apply it to the tiny rank vector and
never form the dense ``R·S·L``.

What the real part does to the scales (METHODS.md's formula, followed as written): ``S``'s
eigenvalue at frequency ``m`` is ``(K_m + K_{q−m}) / 2``, so frequencies ``m`` and ``q−m`` share
the mean of their two scales. With ``r_in = 1`` the spectrum is nearly flat: the BERT scales
``1, 4, …, 28`` give ``1`` at the zero frequency and ``16`` at all seven others, ``1, 2, 3, 4``
(LLaMA) give ``1, 3, 3, 3``. Radial scaling keeps every scale distinct.

Backward (``W`` and ``b`` frozen, ``S`` constant), with ``g = ∂ℓ/∂y`` and ``c = α/r_in``::

    dv = c · g·R,   du = dv·S          (S symmetric in both modes, so du = scale(dv))
    ∂ℓ/∂x = g·W + du·L,   ∂ℓ/∂L = duᵀ·x,   ∂ℓ/∂R = c · gᵀ·v
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("radial", "fft")


def expand_scales(scales: Sequence[float] | torch.Tensor, r_in: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``K``: each scale repeated ``r_in`` times, fp32, length ``n·r_in``."""
    k = torch.as_tensor(scales, dtype=torch.float32, device=device).reshape(-1)
    return k.repeat_interleave(int(r_in))


def apply_scaling(u: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """The rank-axis scaling, literally: ``u ⊙ K`` or ``Re(IFFT(K ⊙ FFT(u)))`` on the last axis.

    Computed in fp32 (fp64 when ``u`` is fp64) and returned in that precision.
    """
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = u.to(work)
    k = k.to(device=u.device, dtype=work)
    if mode == "radial":
        return u * k
    if mode == "fft":
        return torch.fft.ifft(torch.fft.fft(u, dim=-1) * k, dim=-1).real
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def scaling_matrix(scales: Sequence[float] | torch.Tensor, r_in: int, alpha: float, mode: str,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(α/r_in)·S`` as a dense ``q×q`` matrix with ``v = u·Sᵀ`` (see the module docstring).

    The fft matrix is built from the cosine sum in fp64 and rounded once to ``dtype``.
    """
    k = expand_scales(scales, r_in, device="cpu").to(torch.float64)
    q = k.numel()
    if mode == "radial":
        s = torch.diag(k)
    elif mode == "fft":
        idx = torch.arange(q, dtype=torch.float64)
        diff = idx[:, None] - idx[None, :]                                  # j − k
        phase = 2.0 * math.pi * idx[None, None, :] * diff[:, :, None] / q   # [j, k, m]
        s = (torch.cos(phase) * k).sum(-1) / q
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return (s * (float(alpha) / int(r_in))).to(device=device, dtype=dtype)


def multiscale_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_l: torch.Tensor, lora_r: torch.Tensor, scales, alpha: float,
                    mode: str = "radial") -> torch.Tensor:
    """``y = x·Wᵀ + b + (α/r_in)·scale(x·Lᵀ)·Rᵀ`` for ``x [..., d_in]``.

    The base linear runs in the input dtype (what eager PyTorch does); the low-rank path runs in
    fp32 (fp64 for fp64 inputs) with the scaling applied literally (elementwise or via
    ``torch.fft``), and the sum is cast once to the input dtype. Differentiable by autograd.
    """
    n = torch.as_tensor(scales).numel()
    r_in = lora_l.shape[0] // n
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = expand_scales(scales, r_in, device=x.device)
    u = x.to(work) @ lora_l.to(work).t()
    v = apply_scaling(u, k, mode)
    low = (v @ lora_r.to(work).t()) * (float(alpha) / r_in)
    base = F.linear(x, weight, bias)
    return (base.to(work) + low).to(x.dtype)


def multiscale_lora_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             lora_l: torch.Tensor, lora_r: torch.Tensor, scales, alpha: float,
                             mode: str = "radial"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂ℓ/∂x, ∂ℓ/∂L, ∂ℓ/∂R)`` by the explicit formulas of the module docstring, computed in
    fp32 (fp64 for fp64 inputs) and cast to the dtypes of ``x``, ``L`` and ``R``."""
    n = torch.as_tensor(scales).numel()
    r_in = lora_l.shape[0] // n
    c = float(alpha) / r_in
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = expand_scales(scales, r_in, device=x.device)
    g, xw = grad_y.to(work), x.to(work)
    lw, rw = lora_l.to(work), lora_r.to(work)
    v = apply_scaling(xw @ lw.t(), k, mode)
    du = apply_scaling(c * (g @ rw), k, mode)
    grad_x = g @ weight.to(work) + du @ lw
    grad_l = du.t() @ xw
    grad_r = c * (g.t() @ v)
    return grad_x.to(x.dtype), grad_l.to(lora_l.dtype), grad_r.to(lora_r.dtype)


def merged_weight(weight: torch.Tensor, lora_l: torch.Tensor, lora_r: torch.Tensor, scales,
                  alpha: float, mode: str = "radial") -> torch.Tensor:
    """``W + (α/r_in)·R·S·L`` in fp32 (fp64 for fp64 weights), cast once to ``weight``'s dtype: the weight of the single
    linear layer equal to the op (used for merging, and as the official dense formulation)."""
    n = torch.as_tensor(scales).numel()
    r_in = lora_l.shape[0] // n
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    s = scaling_matrix(scales, r_in, alpha, mode, device=weight.device, dtype=work)
    delta = lora_r.to(work) @ s @ lora_l.to(work)
    return (weight.to(work) + delta).to(weight.dtype)
