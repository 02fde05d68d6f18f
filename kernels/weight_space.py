"""Triton kernels for the weight-space ops (Fine-mixing, Fine-purifying, E-PUR).

Each launcher implements the backend contract of :mod:`purify_fast.ops.weight_space` on flat
contiguous tensors and writes into preallocated outputs; the math is that of
:mod:`purify_fast.reference.weight_space`, reproduced bit for bit where the reference is exact:

* random masks: the same Philox4x32-10 draw per element index, in uint32 arithmetic;
* scores: the reference's fp32 operation order with IEEE round-to-nearest division
  (``tl.math.div_rn``; a plain ``/`` lowers to an approximate division on NVIDIA GPUs), so the
  histogram counts and the selections match the reference exactly for the same inputs.

Everything runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), where the launchers pick one big block so that the per-program cost of the
interpreter (about a millisecond) is paid a few times rather than thousands.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

NUM_BINS = 1 << 16
_NUM_BINS = tl.constexpr(NUM_BINS)  # kernels may only read constexpr globals

# Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC 2011).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

# Memory-bound elementwise kernels on Hopper: a few thousand elements per program keeps enough
# bytes in flight per SM without spilling. Philox costs ~10 integer multiply pairs per element, so
# the mixing kernel uses a smaller block to keep more programs resident.
_GPU_BLOCK = 2048
_GPU_WARPS = 8
_GPU_MIX_BLOCK = 1024
_GPU_MIX_WARPS = 4
_GPU_EMB_TILE = 4096  # elements of a [rows, cols] tile in the E-PUR row-norm kernel
# Under the interpreter each program instance costs ~1 ms of Python overhead while the work inside
# is vectorised numpy, so one program should cover as much as memory comfortably allows.
_INTERP_BLOCK = 1 << 16
# Launch option of the kernels that add a product (``acc + x*y``): Triton contracts that into one
# FMA by default, while the CUDA (__fadd_rn/__fmul_rn), C++ (-ffp-contract=off) and reference
# code round the product and the sum separately.
_NO_FMA = {"enable_fp_fusion": False}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block(n: int, gpu_block: int) -> int:
    if _interpreting():
        return max(16, min(triton.next_power_of_2(n), _INTERP_BLOCK))
    return gpu_block


def _require(t: torch.Tensor, name: str, like: torch.Tensor | None = None,
             dtype: torch.dtype | None = None) -> None:
    """Launchers index raw memory, so a wrong layout would read garbage rather than fail."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the ops layer flattens before calling)")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but pre is on {like.device}")
        if t.numel() != like.numel():
            raise ValueError(f"{name} has {t.numel()} elements but pre has {like.numel()}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and _interpreting()):
        raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA tensors "
                         f"(or CPU tensors with TRITON_INTERPRET=1)")


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; a tensor on another GPU needs it switched.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- Philox mixing

@triton.jit
def _philox_word0(c0, c1, k0, k1):
    """First output word of Philox4x32-10 at counter ``(c0, c1, 0, 0)`` and key ``(k0, k1)``.

    One round, with ``mulhilo(a, b) = (hi32(a*b), lo32(a*b))``::

        (hi0, lo0) = mulhilo(M0, c0);  (hi1, lo1) = mulhilo(M1, c2)
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        (k0, k1) += (W0, W1)    (between rounds, mod 2**32)

    ``c0, c1``: uint32 blocks; ``k0, k1``: uint32 scalars. Returns a uint32 block.
    """
    # Round 1 has c2 = c3 = 0, so its second multiply is zero and is skipped.
    hi0 = tl.umulhi(c0, PHILOX_M0)
    lo0 = c0 * PHILOX_M0
    c0, c1, c2, c3 = c1 ^ k0, c1 * 0, hi0 ^ k1, lo0
    for _ in tl.static_range(8):
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    # Round 10: only the first output word is needed, so only the second multiply's high half.
    k0 = k0 + PHILOX_W0
    return tl.umulhi(c2, PHILOX_M1) ^ c1 ^ k0


@triton.jit(do_not_specialize=["seed_word", "key_word", "keep_threshold"])
def _mix_random_kernel(pre_ptr, ft_ptr, out_ptr, n, seed_word, key_word, keep_threshold,
                       BLOCK: tl.constexpr):
    """``out[i] = ft[i] if philox(i) < T else pre[i]`` for flat ``pre, ft, out`` of ``n`` elements.

    ``philox(i)`` is the first word of Philox4x32-10 at counter ``(i mod 2**32, i >> 32, 0, 0)``
    with key ``(seed_word, key_word)``; ``T = keep_threshold`` in ``[0, 2**32]`` is compared in
    64 bits so that ``T = 2**32`` keeps everything. A select, so kept values are bit-exact copies.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    word = _philox_word0(c0, c1, seed_word.to(tl.uint32), key_word.to(tl.uint32))
    keep = word.to(tl.int64) < keep_threshold.to(tl.int64)
    pre = tl.load(pre_ptr + offs, mask=mask)
    ft = tl.load(ft_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.where(keep, ft, pre), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_kernel(index_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    """``out[j] = philox(index[j])``: first Philox4x32-10 word at counter ``(lo32, hi32, 0, 0)`` of
    the int64 ``index[j]`` with key ``(k0, k1)``, stored zero-extended in int64."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(index_ptr + offs, mask=mask, other=0)
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
    word = _philox_word0(c0, c1, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + offs, word.to(tl.int64), mask=mask)


def philox_uint32(index: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The mixing kernel's random draw at arbitrary element indices (int64 [N] in, int64 [N] out,
    values in [0, 2**32)); lets tests reach counters beyond 2**32 without 2**32-element tensors."""
    _require(index, "index", dtype=torch.int64)
    for name, value in (("k0", k0), ("k1", k1)):
        if not (isinstance(value, int) and 0 <= value < 2**32):
            raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    out = torch.empty_like(index)
    n = index.numel()
    if n:
        block = _block(n, _GPU_MIX_BLOCK)
        with _device_guard(index):
            _philox_kernel[(triton.cdiv(n, block),)](index, out, n, k0, k1, BLOCK=block,
                                                     num_warps=_GPU_MIX_WARPS)
    return out


def mix_random(pre: torch.Tensor, ft: torch.Tensor, out: torch.Tensor, seed_word: int,
               key_word: int, keep_threshold: int) -> torch.Tensor:
    """Fine-mixing with a Philox Bernoulli mask: ``out = where(philox(i) < T, ft, pre)``.

    ``pre, ft, out``: flat contiguous tensors of one float dtype, ``N`` elements. ``seed_word``,
    ``key_word`` in ``[0, 2**32)``; ``keep_threshold`` ``T`` in ``[0, 2**32]``.
    """
    _require(pre, "pre")
    _require(ft, "ft", pre, pre.dtype)
    _require(out, "out", pre, pre.dtype)
    for name, value, hi in (("seed_word", seed_word, 2**32), ("key_word", key_word, 2**32),
                            ("keep_threshold", keep_threshold, 2**32 + 1)):
        if not (isinstance(value, int) and 0 <= value < hi):
            raise ValueError(f"{name} must be an int in [0, {hi}), got {value!r}")
    n = pre.numel()
    if n == 0:
        return out
    interp = _interpreting()
    block = _block(n, _GPU_MIX_BLOCK)
    with _device_guard(pre):
        _mix_random_kernel[(triton.cdiv(n, block),)](
            pre, ft, out, n, seed_word, key_word, keep_threshold, BLOCK=block,
            num_warps=4 if interp else _GPU_MIX_WARPS)
    return out


# --------------------------------------------------------------------------- diagonal Fisher

@triton.jit
def _fisher_kernel(acc_ptr, grad_ptr, n, scale, BLOCK: tl.constexpr):
    """``acc[i] += (g[i] * g[i]) * scale``, ``g`` upcast to fp32; ``acc`` fp32, ``n`` elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    acc = tl.load(acc_ptr + offs, mask=mask)
    tl.store(acc_ptr + offs, acc + (g * g) * scale, mask=mask)


def fisher_accumulate_(acc: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Diagonal Fisher step in place: ``acc += scale * grad**2``; ``acc`` fp32 [N], ``grad`` [N]."""
    _require(acc, "acc", dtype=torch.float32)
    _require(grad, "grad", acc)
    n = acc.numel()
    if n == 0:
        return acc
    block = _block(n, _GPU_BLOCK)
    with _device_guard(acc):
        _fisher_kernel[(triton.cdiv(n, block),)](acc, grad, n, float(scale), BLOCK=block,
                                                 num_warps=_GPU_WARPS, **_NO_FMA)
    return acc


# --------------------------------------------------------------------------- scores

@triton.jit
def _score(pre_ptr, ft_ptr, h_ptr, offs, mask, eps, INDICATOR: tl.constexpr):
    """fp32 suspicion score of each element, in the reference's operation order::

        d = float(ft) - float(pre)
        0 drift_over_hessian: (d*d) / (H + eps)      2 inv_hessian: 1 / (H + eps)
        1 drift:              |d|                     3 product:     (d*d) * H

    Division is IEEE round-to-nearest so the bit pattern equals the reference's.
    """
    if INDICATOR == 2:
        h = tl.load(h_ptr + offs, mask=mask, other=1.0)
        s = tl.math.div_rn(tl.full(h.shape, 1.0, tl.float32), h + eps)
    else:
        pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ft = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = ft - pre
        if INDICATOR == 0:
            h = tl.load(h_ptr + offs, mask=mask, other=1.0)
            s = tl.math.div_rn(d * d, h + eps)
        elif INDICATOR == 1:
            s = tl.abs(d)
        else:
            h = tl.load(h_ptr + offs, mask=mask, other=0.0)
            s = (d * d) * h
    return s


@triton.jit
def _histogram_kernel(pre_ptr, ft_ptr, h_ptr, hist_ptr, n, eps, prefix,
                      INDICATOR: tl.constexpr, LEVEL2: tl.constexpr, BLOCK: tl.constexpr):
    """Radix-select histogram of score bit patterns over ``n`` elements, added into ``hist``.

    ``bits = float_bits(score) & 0x7FFFFFFF`` (scores are >= 0, so bits order like values).
    Level 1 (``LEVEL2`` False): ``hist[bits >> 16] += 1``. Level 2: elements with
    ``bits >> 16 == prefix`` add ``hist[bits & 0xFFFF] += 1``. ``hist``: int64 [65536].
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _score(pre_ptr, ft_ptr, h_ptr, offs, mask, eps, INDICATOR)
    bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if LEVEL2:
        mask = mask & ((bits >> 16) == prefix)
        bins = bits & 0xFFFF
    else:
        bins = bits >> 16
    # Unchanged coordinates (score 0) or a narrow score range pile onto one bin, and atomics to one
    # address serialise; the block's most common case is counted with a reduction and one atomic.
    low = tl.min(tl.where(mask, bins, _NUM_BINS), axis=0)
    at_low = mask & (bins == low)
    n_low = tl.sum(at_low.to(tl.int64), axis=0)
    tl.atomic_add(hist_ptr + low, n_low, mask=n_low > 0, sem="relaxed")
    rest = mask & (bins != low)
    tl.atomic_add(hist_ptr + bins, tl.full(bins.shape, 1, tl.int64), mask=rest, sem="relaxed")


def _check_scoring(pre, ft, hessian, indicator: int) -> None:
    _require(pre, "pre")
    _require(ft, "ft", pre, pre.dtype)
    if indicator not in (0, 1, 2, 3):
        raise ValueError(f"indicator must be a code in 0..3, got {indicator!r}")
    if hessian is None:
        if indicator != 1:
            raise ValueError(f"indicator code {indicator} needs a hessian tensor (got None)")
    else:
        _require(hessian, "hessian", pre, torch.float32)


def score_histogram(pre: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor | None,
                    indicator: int, eps: float, hist: torch.Tensor, prefix: int) -> torch.Tensor:
    """Add the counts of score bit patterns of ``N`` coordinates into ``hist`` (int64 [65536]).

    ``prefix < 0``: bin = high 16 bits of the score's fp32 pattern; else only scores whose high 16
    bits equal ``prefix`` count, in bin = low 16 bits. ``pre, ft``: [N], ``hessian``: fp32 [N] or
    None (indicator 1 only).
    """
    _check_scoring(pre, ft, hessian, indicator)
    _require(hist, "hist", dtype=torch.int64)
    if hist.numel() != NUM_BINS or hist.device != pre.device:
        raise ValueError(f"hist must have {NUM_BINS} bins on {pre.device}, got {hist.numel()} "
                         f"on {hist.device}")
    if prefix >= NUM_BINS:
        raise ValueError(f"prefix must be < {NUM_BINS} (or negative for level 1), got {prefix}")
    n = pre.numel()
    if n == 0:
        return hist
    block = _block(n, _GPU_BLOCK)
    with _device_guard(pre):
        _histogram_kernel[(triton.cdiv(n, block),)](
            pre, ft, pre if hessian is None else hessian, hist, n, float(eps), max(int(prefix), 0),
            INDICATOR=int(indicator), LEVEL2=prefix >= 0, BLOCK=block, num_warps=_GPU_WARPS)
    return hist


@triton.jit
def _select_kernel(pre_ptr, ft_ptr, h_ptr, out_ptr, n, eps, threshold,
                   INDICATOR: tl.constexpr, TAKES_FT: tl.constexpr, BLOCK: tl.constexpr):
    """``sel = score >= threshold`` (fp32); ``out = where(sel, ft, pre)`` if ``TAKES_FT`` else
    ``where(sel, pre, ft)``, on ``n`` flat elements; values are copied, never recomputed."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _score(pre_ptr, ft_ptr, h_ptr, offs, mask, eps, INDICATOR)
    sel = s >= threshold
    pre = tl.load(pre_ptr + offs, mask=mask)
    ft = tl.load(ft_ptr + offs, mask=mask)
    if TAKES_FT:
        res = tl.where(sel, ft, pre)
    else:
        res = tl.where(sel, pre, ft)
    tl.store(out_ptr + offs, res, mask=mask)


def select_by_score(pre: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor | None,
                    indicator: int, eps: float, threshold: float, selected_takes_finetuned: bool,
                    out: torch.Tensor) -> torch.Tensor:
    """Fine-purifying reset / magnitude mixing: coordinates with ``score >= threshold`` are
    selected; selected take ``ft`` (``selected_takes_finetuned``) or ``pre``, the rest the other.
    All of ``pre, ft, out``: [N] of one dtype; ``hessian``: fp32 [N] or None."""
    _check_scoring(pre, ft, hessian, indicator)
    _require(out, "out", pre, pre.dtype)
    n = pre.numel()
    if n == 0:
        return out
    block = _block(n, _GPU_BLOCK)
    with _device_guard(pre):
        _select_kernel[(triton.cdiv(n, block),)](
            pre, ft, pre if hessian is None else hessian, out, n, float(eps), float(threshold),
            INDICATOR=int(indicator), TAKES_FT=bool(selected_takes_finetuned), BLOCK=block,
            num_warps=_GPU_WARPS)
    return out


# --------------------------------------------------------------------------- E-PUR

@triton.jit
def _embedding_drift_kernel(pre_ptr, ft_ptr, freq_ptr, out_ptr, n_rows, c, N_COLS: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """E-PUR row score ``out[i] = sqrt(sum_j (ft[i,j] - pre[i,j])**2) / log(max(f[i], c))``.

    ``pre, ft``: row-major [V, D]; ``f``: fp32 [V]; ``out``: fp32 [V]. One program owns
    ``BLOCK_R`` rows and sweeps the columns in ``BLOCK_C`` chunks, accumulating in fp32.
    ``N_COLS`` (= D) is a compile-time constant: a model has one or two embedding widths, the loop
    bound becomes static, and older interpreters cannot loop over a runtime scalar.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows[:, None] * N_COLS
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, N_COLS, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        m = row_ok[:, None] & (cols < N_COLS)[None, :]
        pre = tl.load(pre_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        ft = tl.load(ft_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = ft - pre
        acc += d * d
    norm = tl.math.sqrt_rn(tl.sum(acc, axis=1))
    f = tl.load(freq_ptr + rows, mask=row_ok, other=1.0)
    denom = tl.log(tl.maximum(f, c))
    tl.store(out_ptr + rows, tl.math.div_rn(norm, denom), mask=row_ok)


def embedding_drift_scores(pre: torch.Tensor, ft: torch.Tensor, freqs: torch.Tensor, c: float,
                           out: torch.Tensor) -> torch.Tensor:
    """E-PUR scores ``||ft[i] - pre[i]||_2 / log(max(f_i, c))`` for contiguous [V, D] ``pre, ft``,
    fp32 [V] ``freqs``, into fp32 [V] ``out``."""
    _require(pre, "pre")
    _require(ft, "ft", pre, pre.dtype)
    if pre.dim() != 2 or ft.shape != pre.shape:
        raise ValueError(f"pre and ft must be 2-D [vocab, dim] of one shape, got "
                         f"{tuple(pre.shape)} and {tuple(ft.shape)}")
    n_rows, n_cols = pre.shape
    for name, t in (("freqs", freqs), ("out", out)):
        _require(t, name, dtype=torch.float32)
        if t.shape != (n_rows,) or t.device != pre.device:
            raise ValueError(f"{name} must be [{n_rows}] on {pre.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if n_rows == 0:
        return out
    if _interpreting():
        block_c = max(16, min(triton.next_power_of_2(n_cols), _INTERP_BLOCK))
        block_r = max(1, min(triton.next_power_of_2(n_rows), _INTERP_BLOCK // block_c))
    else:
        block_c = max(16, min(triton.next_power_of_2(n_cols), 1024))
        block_r = max(1, _GPU_EMB_TILE // block_c)
    with _device_guard(pre):
        _embedding_drift_kernel[(triton.cdiv(n_rows, block_r),)](
            pre, ft, freqs, out, n_rows, float(c), N_COLS=n_cols, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_GPU_WARPS, **_NO_FMA)
    return out
