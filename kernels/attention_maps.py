"""Triton kernels for the MIMIC attention-map loss (see :mod:`purify_fast.reference.attention_maps`
for the math). Launchers follow the backend contract of :mod:`purify_fast.ops.attention_maps`:
flat contiguous inputs, preallocated fp32 outputs, no autograd here.

Forward of one layer runs two kernels: ``_sq_sum_kernel`` (channel energies of the student and
the teacher map, one program per ``(row, block of positions)``) and ``_row_kernel`` (one program
per row: norms, the row loss, and the gradient coefficients ``dL/ds`` that the backward needs, so
the backward is one elementwise pass and never re-reads the teacher).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from purify_fast.kernels.weight_space import _device_guard

# Position/channel tiles: big enough that the CPU interpreter (one Python-level step per program)
# stays fast on small test shapes, small enough to keep registers in check on a GPU.
_MAX_BLOCK_N = 64
_MAX_BLOCK_C = 256
_MAX_BLOCK_ROW = 1024


@triton.jit
def _energy(row_ptr, offs_n, n_ok, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Σ_c F[n, c]²`` in fp32 for the positions ``offs_n`` of one ``[N, C]`` map at ``row_ptr``."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(row_ptr + offs_n[:, None] * C + offs_c[None, :],
                    mask=n_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    return acc


@triton.jit
def _sq_sum_kernel(fs_ptr, ft_ptr, m_ptr, ss_ptr, st_ptr, N, CS, CT,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``ss[b, n] = m[b, n] · Σ_c F_S[b, n, c]²`` and the same for the teacher into ``st``.

    fs: [B, N, CS], ft: [B, N, CT] (any float dtype), m, ss, st: [B, N] fp32. Grid (B, ⌈N/BLOCK_N⌉).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc_s = _energy(fs_ptr + b * N * CS, offs_n, n_ok, CS, BLOCK_N, BLOCK_C)
    acc_t = _energy(ft_ptr + b * N * CT, offs_n, n_ok, CT, BLOCK_N, BLOCK_C)
    m = tl.load(m_ptr + b * N + offs_n, mask=n_ok, other=0.0)
    tl.store(ss_ptr + b * N + offs_n, acc_s * m, mask=n_ok)
    tl.store(st_ptr + b * N + offs_n, acc_t * m, mask=n_ok)


@triton.jit
def _row_kernel(ss_ptr, st_ptr, loss_ptr, N, eps, BLOCK: tl.constexpr):
    """Per row b (grid (B,)), in place on the energies ``ss``/``st`` ([B, N] fp32)::

        a = s_S / max(‖s_S‖, eps),  t = s_T / max(‖s_T‖, eps),  loss[b] = Σ_n (a − t)²
        ss ← dL/ds_S = (2(a−t) − a·⟨a, 2(a−t)⟩·[‖s_S‖>eps]) / max(‖s_S‖, eps)
        st ← dL/ds_T = (−2(a−t) − t·⟨t, −2(a−t)⟩·[‖s_T‖>eps]) / max(‖s_T‖, eps)
    """
    b = tl.program_id(0).to(tl.int64)
    row_s = ss_ptr + b * N
    row_t = st_ptr + b * N
    sq_s = tl.zeros([BLOCK], dtype=tl.float32)
    sq_t = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        ok = offs < N
        s = tl.load(row_s + offs, mask=ok, other=0.0)
        t = tl.load(row_t + offs, mask=ok, other=0.0)
        sq_s += s * s
        sq_t += t * t
    norm_s = tl.sqrt(tl.sum(sq_s, axis=0))
    norm_t = tl.sqrt(tl.sum(sq_t, axis=0))
    den_s = tl.maximum(norm_s, eps)
    den_t = tl.maximum(norm_t, eps)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    dot_s = tl.zeros([BLOCK], dtype=tl.float32)
    dot_t = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        ok = offs < N
        a = tl.load(row_s + offs, mask=ok, other=0.0) / den_s
        t = tl.load(row_t + offs, mask=ok, other=0.0) / den_t
        d = a - t
        loss += d * d
        dot_s += a * (2.0 * d)
        dot_t += t * (-2.0 * d)
    tl.store(loss_ptr + b, tl.sum(loss, axis=0))
    # Below eps the normaliser is the constant eps, so the projection term drops out.
    proj_s = tl.where(norm_s > eps, tl.sum(dot_s, axis=0), 0.0)
    proj_t = tl.where(norm_t > eps, tl.sum(dot_t, axis=0), 0.0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        ok = offs < N
        a = tl.load(row_s + offs, mask=ok, other=0.0) / den_s
        t = tl.load(row_t + offs, mask=ok, other=0.0) / den_t
        d = a - t
        tl.store(row_s + offs, (2.0 * d - a * proj_s) / den_s, mask=ok)
        tl.store(row_t + offs, (-2.0 * d - t * proj_t) / den_t, mask=ok)


@triton.jit
def _grad_kernel(f_ptr, g_ptr, out_ptr, N, C, scale,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[b, n, c] = scale · g[b, n] · 2 F[b, n, c]`` cast to out's dtype.

    f, out: [B, N, C]; g: [B, N] fp32. Grid (B, ⌈N/BLOCK_N⌉).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    g = tl.load(g_ptr + b * N + offs_n, mask=n_ok, other=0.0) * (2.0 * scale)
    base = b * N * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        idx = base + offs_n[:, None] * C + offs_c[None, :]
        ok = n_ok[:, None] & (offs_c[None, :] < C)
        x = tl.load(f_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, (g[:, None] * x).to(out_ptr.dtype.element_ty), mask=ok)


def _blocks(n: int, c: int) -> tuple[int, int]:
    return (min(_MAX_BLOCK_N, triton.next_power_of_2(max(n, 1))),
            min(_MAX_BLOCK_C, triton.next_power_of_2(max(c, 1))))


def attention_map_forward(fs: torch.Tensor, ft: torch.Tensor, mask: torch.Tensor, eps: float,
                          loss_rows: torch.Tensor, gs: torch.Tensor, gt: torch.Tensor) -> None:
    """Row losses and gradient coefficients of one layer (see the module docstring).

    fs [B, N, CS], ft [B, N, CT] contiguous; mask [B, N] fp32; outputs loss_rows [B],
    gs [B, N], gt [B, N] fp32 (gs/gt first hold the energies, then dL/ds in place).
    """
    B, N, CS = fs.shape
    CT = ft.shape[2]
    block_n, block_c = _blocks(N, max(CS, CT))
    block_row = min(_MAX_BLOCK_ROW, triton.next_power_of_2(max(N, 1)))
    with _device_guard(fs):
        _sq_sum_kernel[(B, triton.cdiv(N, block_n))](fs, ft, mask, gs, gt, N, CS, CT,
                                                     BLOCK_N=block_n, BLOCK_C=block_c)
        _row_kernel[(B,)](gs, gt, loss_rows, N, float(eps), BLOCK=block_row)


def attention_map_backward(f: torch.Tensor, g: torch.Tensor, scale: float,
                           out: torch.Tensor) -> None:
    """``out = scale · g[..., None] · 2 f`` for f [B, N, C] contiguous, g [B, N] fp32."""
    B, N, C = f.shape
    block_n, block_c = _blocks(N, C)
    with _device_guard(f):
        _grad_kernel[(B, triton.cdiv(N, block_n))](f, g, out, N, C, float(scale),
                                                   BLOCK_N=block_n, BLOCK_C=block_c)
