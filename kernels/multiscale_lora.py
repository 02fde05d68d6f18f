"""Triton kernels of the multi-scale LoRA (MSLR) linear op (math in
``purify_fast.reference.multiscale_lora``).

The op ``y = x·Wᵀ + b + (α/r_in)·scale(x·Lᵀ)·Rᵀ`` is split into two launches:

1. :func:`mslora_project`: ``V = (X·Lᵀ)·Sᵀ`` in fp32, ``V [M, Q]`` (``Q = n·r_in``, tiny). ``S`` is
   the ``Q×Q`` fp32 matrix ``(α/r_in)·diag(K)`` (radial) or ``(α/r_in)·Re(F⁻¹ diag(K) F)`` (fft),
   built once by the launcher's caller; for real rank vectors applying it equals
   ``Re(IFFT(K ⊙ FFT(u)))`` (tested against ``torch.fft``). One program owns ``BLOCK_M`` rows and
   reads its rows of ``X`` once.
2. :func:`mslora_linear`: ``Y = X·Wᵀ + b + V·Rᵀ``, a tiled GEMM whose epilogue adds the bias and
   the rank-``Q`` update ``V_tile [BM, Q] · Rᵀ_tile [Q, BN]`` to the fp32 accumulator before the
   single cast and store, so ``R·S·L`` is never formed and ``Y`` is written exactly once.

Why not compute ``X·Lᵀ`` inside the GEMM's K loop: every one of the ``N / BLOCK_N`` column tiles
would recompute it (``Q_pad / BLOCK_N`` ≈ 12 % extra tensor-core work at BLOCK_N 128), while the
separate projection costs one read of ``X`` (a few % of the GEMM at LLaMA shapes).

Backward reuses both kernels with transposed views (``W``, ``b`` frozen; ``S`` symmetric)::

    D = (G·R)·Sᵀᵀ  = mslora_project(G, Rᵀ, Sᵀ)          (= du, [M, Q] fp32)
    ∂x = G·W + D·L = mslora_linear(G, Wᵀ, None, D, Lᵀ)
    ∂L = Dᵀ·X,  ∂R = Gᵀ·V                               (plain GEMMs, left to torch.matmul)

``∂L`` and ``∂R`` reduce over all ``M`` tokens into tiny ``[Q, d]`` outputs: a split-K reduction
that cuBLAS/oneDNN already do at bandwidth, so a custom kernel would add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from purify_fast.backend import triton_interpreting
from purify_fast.kernels.weight_space import _device_guard


@triton.jit
def _project_kernel(x_ptr, l_ptr, s_ptr, v_ptr, M, K, Q,
                    stride_xm, stride_xk, stride_lq, stride_lk, stride_sj, stride_sk,
                    stride_vm, stride_vq,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``V[m, j] = Σ_t S[j, t] · Σ_k X[m, k] · L[t, k]`` for ``BLOCK_M`` rows; fp32 throughout.

    X [M, K] (fp32/fp16/bf16), L [Q, K] (same dtype), S [Q, Q] fp32, V [M, Q] fp32.
    """
    # int64 indices: row·stride (or k·stride of a transposed view) can pass 2**31 elements.
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rq = tl.arange(0, BLOCK_Q).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        lt = tl.load(l_ptr + rq[None, :] * stride_lq + kk[:, None] * stride_lk,
                     mask=(rq[None, :] < Q) & (kk[:, None] < K), other=0.0)
        if UPCAST:
            # The CPU interpreter multiplies half-precision dots wrongly; fp32 is exact here.
            x = x.to(tl.float32)
            lt = lt.to(tl.float32)
        if IEEE:
            # fp32 inputs: fp32 products (the default would be TF32 on NVIDIA GPUs).
            acc += tl.dot(x, lt, input_precision="ieee")
        else:
            acc += tl.dot(x, lt)
    # S is applied as a Q×Q fp32 dot: exact fp32 products for the tiny rank vector.
    st = tl.load(s_ptr + rq[None, :] * stride_sj + rq[:, None] * stride_sk,
                 mask=(rq[None, :] < Q) & (rq[:, None] < Q), other=0.0)
    v = tl.dot(acc, st, input_precision="ieee")
    tl.store(v_ptr + rm[:, None] * stride_vm + rq[None, :] * stride_vq, v,
             mask=(rm[:, None] < M) & (rq[None, :] < Q))


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, v_ptr, r_ptr, y_ptr, M, N, K, Q,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_vm, stride_vq,
                   stride_rn, stride_rq, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``Y[m, n] = Σ_k X[m, k]·W[n, k] + b[n] + Σ_j V[m, j]·R[n, j]``, fp32 accumulator, one cast
    on store.

    X [M, K], W [N, K], R [N, Q], b [N] in the input dtype (any strides), V [M, Q] fp32,
    Y [M, N]. Tiles are visited in groups of ``GROUP_M`` row tiles so that neighbouring programs
    share W tiles in L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    # int64 indices: row·stride (or k·stride of a transposed view) can pass 2**31 elements.
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                     mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, wt, input_precision="ieee")
        else:
            acc += tl.dot(x, wt)

    # Epilogue: rank-Q update from the fp32 projections, in fp32 (Q is tiny, so ieee is cheap).
    rq = tl.arange(0, BLOCK_Q).to(tl.int64)
    v = tl.load(v_ptr + rm[:, None] * stride_vm + rq[None, :] * stride_vq,
                mask=(rm[:, None] < M) & (rq[None, :] < Q), other=0.0)
    rt = tl.load(r_ptr + rn[None, :] * stride_rn + rq[:, None] * stride_rq,
                 mask=(rn[None, :] < N) & (rq[:, None] < Q), other=0.0).to(tl.float32)
    acc += tl.dot(v, rt, input_precision="ieee")
    if HAS_BIAS:
        b = tl.load(b_ptr + rn * stride_b, mask=rn < N, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _gpu_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                                      (128, 64, 64, 4, 4), (256, 128, 64, 8, 3)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


# Autotuning needs a real device; the interpreter runs one fixed, large-block configuration.
_linear_kernel_tuned = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K", "Q"])(
    _linear_kernel)


def _block_q(q: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(q))


def mslora_project(x: torch.Tensor, lora_l: torch.Tensor, s: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """``out[M, Q] (fp32) = (x[M, K]·lora_lᵀ)·sᵀ`` with ``lora_l [Q, K]``, ``s [Q, Q]`` fp32."""
    m, k = x.shape
    q = lora_l.shape[0]
    interp = triton_interpreting() and x.device.type == "cpu"
    block_m = 64
    block_k = 128 if interp else 64
    grid = (triton.cdiv(m, block_m),)
    with _device_guard(x):
        _project_kernel[grid](x, lora_l, s, out, m, k, q,
                              x.stride(0), x.stride(1), lora_l.stride(0), lora_l.stride(1),
                              s.stride(0), s.stride(1), out.stride(0), out.stride(1),
                              BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_Q=_block_q(q),
                              UPCAST=interp, IEEE=x.dtype == torch.float32, num_warps=4)
    return out


def mslora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  v: torch.Tensor, lora_r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[M, N] = x[M, K]·weightᵀ + bias + v·lora_rᵀ`` with ``weight [N, K]`` (any strides),
    ``v [M, Q]`` fp32, ``lora_r [N, Q]``."""
    m, k = x.shape
    n = weight.shape[0]
    q = v.shape[1]
    interp = triton_interpreting() and x.device.type == "cpu"
    ieee = x.dtype == torch.float32  # fp32 inputs get fp32 products, as torch.matmul does by default
    # The bias is read through its stride: a sliced or expanded (stride 0) view is not dense.
    args = (x, weight, bias if bias is not None else x, v, lora_r, out, m, n, k, q,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0,
            v.stride(0), v.stride(1), lora_r.stride(0), lora_r.stride(1),
            out.stride(0), out.stride(1))
    with _device_guard(x):
        if interp or x.device.type != "cuda":
            bm, bn, bk = 64, 64, 128
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            _linear_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                                 BLOCK_K=bk, BLOCK_Q=_block_q(q), GROUP_M=8, UPCAST=interp,
                                 IEEE=ieee)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _linear_kernel_tuned[grid](*args, HAS_BIAS=bias is not None, BLOCK_Q=_block_q(q),
                                       UPCAST=False, IEEE=ieee)
    return out
