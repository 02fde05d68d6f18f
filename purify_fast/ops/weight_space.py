"""Weight-space ops: mixing, diagonal Fisher, drift/Hessian scoring with a global threshold, reset,
and E-PUR embedding drift scores.

Each op validates its inputs, flattens them, picks a backend (:mod:`purify_fast.backend`) and calls
the function of the same name in that backend's kernel module. Every backend module
(``purify_fast._C``, ``purify_fast._C_cuda``, ``purify_fast.kernels``) implements this contract on
flat contiguous tensors, writing into preallocated outputs:

=====================================================================================  ==========
``mix_random(pre, ft, out, seed_word, key_word, keep_threshold)``                       Philox mask
``fisher_accumulate_(acc, grad, scale)``                                                 acc fp32
``score_histogram(pre, ft, hessian|None, indicator, eps, hist, prefix)``                 int64 hist
``select_by_score(pre, ft, hessian|None, indicator, eps, threshold, takes_ft, out)``     select
``embedding_drift_scores(pre[V,D], ft[V,D], freqs_fp32[V], c, out_fp32[V])``             E-PUR
=====================================================================================  ==========

The math of each is in :mod:`purify_fast.reference.weight_space`.

These are weight edits, not layers: none is differentiable, so every op runs without autograd on
every backend (the readable torch backend would otherwise record a graph through inputs that
require grad, and the compiled ones cannot): outputs never require grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from purify_fast import backend as _backend
from purify_fast.reference import weight_space as ref
from purify_fast.validation import seed_value

INDICATORS = tuple(ref.INDICATORS)
NUM_BINS = ref.NUM_BINS
_NEEDS_HESSIAN = {"drift_over_hessian", "inv_hessian", "product"}
_SELECT_MODES = ("random", "magnitude")


# --------------------------------------------------------------------------- validation helpers

def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _check_pair(pre, ft, names=("pretrained", "finetuned")) -> None:
    _check_tensor(pre, names[0])
    _check_tensor(ft, names[1])
    if pre.shape != ft.shape:
        raise ValueError(f"{names[1]} shape {tuple(ft.shape)} does not match {names[0]} shape "
                         f"{tuple(pre.shape)}")
    if pre.dtype != ft.dtype:
        raise TypeError(f"{names[1]} dtype {ft.dtype} does not match {names[0]} dtype {pre.dtype}")
    if pre.device != ft.device:
        raise ValueError(f"{names[1]} is on {ft.device} but {names[0]} is on {pre.device}")


# torch implements isfinite for no 8-bit float (float8_e4m3fn, float8_e5m2, ...): those are
# checked as float32, which holds every value of theirs, a chunk at a time.
_UPCAST_CHUNK = 1 << 24


def _nonfinite_count(t: torch.Tensor) -> int:
    if t.element_size() > 1:
        return int((~torch.isfinite(t)).sum())
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + _UPCAST_CHUNK].float())).sum())
               for i in range(0, flat.numel(), _UPCAST_CHUNK))


def _all_finite(t: torch.Tensor) -> bool:
    # The compiled scan reads the tensor once with no temporaries; eager isfinite().all() builds a
    # bool tensor and costs more than the mixing itself on CPU. auto's pick, not the variable's:
    # the answer does not depend on the backend, and an op named backend="torch" must not fail on
    # a bad PURIFY_FAST_BACKEND.
    kernel = "cuda" if t.device.type == "cuda" else "cpp"
    if t.dtype in _backend.KERNEL_DTYPES and _backend.fastest(t.device, t.dtype) == kernel:
        return bool(_backend.module(kernel).all_finite(t.contiguous().view(-1)))
    if t.element_size() == 1:
        return _nonfinite_count(t) == 0
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not _all_finite(t):
        bad = _nonfinite_count(t)
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); clean the checkpoint or pass "
                         f"check_finite=False to let them through (results are then undefined)")


def _check_hessian_values(h: torch.Tensor, check_finite: bool = True) -> None:
    """Non-negative (and finite, unless ``check_finite`` is off): a diagonal Fisher is a mean of
    squares. A negative entry (a true Hessian's diagonal can have them) has no place in the
    scores: the histogram ranks their magnitude while the reset compares signed values, so the
    two would disagree. Checked even with ``check_finite=False``, which only lets NaN/Inf pass."""
    if check_finite:
        _check_finite(h, "hessian")
    if h.numel() and float(h.amin()) < 0:  # one reduction, no temporary
        bad = int((h < 0).sum())
        raise ValueError(f"hessian has {bad} negative value(s); Fine-purifying needs a non-negative "
                         f"diagonal (e.g. the Fisher: the mean of squared gradients)")


def _check_hessian(hessian, pre: torch.Tensor, indicator: str) -> torch.Tensor | None:
    if indicator not in ref.INDICATORS:
        raise ValueError(f"indicator must be one of {', '.join(map(repr, INDICATORS))}; "
                         f"got {indicator!r}")
    if hessian is None:
        if indicator in _NEEDS_HESSIAN:
            raise ValueError(f"indicator {indicator!r} needs a hessian tensor (got None)")
        return None
    _check_tensor(hessian, "hessian")
    if hessian.shape != pre.shape:
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match pretrained shape "
                         f"{tuple(pre.shape)}")
    if hessian.device != pre.device:
        raise ValueError(f"hessian is on {hessian.device} but pretrained is on {pre.device}")
    return hessian


def _check_rho(rho) -> float:
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise TypeError(f"rho must be a number in [0, 1], got {rho!r}") from None
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    return value


def _check_eps(eps) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a positive finite number, got {eps!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return value


def _check_out(out, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(f"out must have shape {tuple(like.shape)}, dtype {dtype} and device "
                         f"{like.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}")
    return out


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_no_partial_overlap(written: torch.Tensor, written_name: str,
                              read: torch.Tensor | None, read_name: str) -> None:
    """Refuse an output that shares memory with an input without being that very tensor: the
    kernels read and write in blocks, in no set order, so an element may be read after another
    one's result overwrote it (the C++ backend gave garbage). The identical tensor (``out=
    pretrained``, same offset, shape, strides and dtype) is fine: each element is read before its
    own result is written."""
    if read is None or written.device.type == "meta" or read.numel() == 0 or written.numel() == 0:
        return
    if (written.data_ptr() == read.data_ptr() and written.dtype == read.dtype
            and written.shape == read.shape and written.stride() == read.stride()):
        return
    w0, w1 = _byte_range(written)
    r0, r1 = _byte_range(read)
    if w0 < r1 and r0 < w1:
        raise ValueError(f"{written_name} partly overlaps {read_name} in memory (same storage, "
                         f"other offset, shape, strides or dtype), so the result would depend on "
                         f"the order elements are written; pass {read_name}.clone(), a separate "
                         f"{written_name}, or the identical tensor")


def _check_seed(seed) -> int:
    # A 0-d integer tensor (a seed drawn with torch) is the int it holds; the rest, bool refused
    # as a slip, is the project's one seed rule.
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not (
            seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool):
        seed = int(seed.item())
    return seed_value(seed)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous().view(-1)


def _flat_hessian(h: torch.Tensor | None) -> torch.Tensor | None:
    # Kernels read the Hessian as fp32 (it is an fp32 accumulator in practice).
    return None if h is None else h.to(torch.float32).contiguous().view(-1)


# The PyTorch reference builds several full-size temporaries (int64 Philox counters, fp32
# scores): ~100-240 bytes per element, 15-30 GB for a LLaMA-7B embedding. Run it over chunks of
# this many elements so the torch backend keeps the streaming memory bound too.
TORCH_CHUNK = 1 << 20


def _chunks(n: int):
    return ((start, min(n, start + TORCH_CHUNK)) for start in range(0, n, TORCH_CHUNK))


def _write_result(out: torch.Tensor, run: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Run a kernel that writes a flat contiguous buffer, into ``out`` whatever its strides."""
    if out.is_contiguous():
        run(out.view(-1))
    else:
        buf = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        run(buf.view(-1))
        out.copy_(buf)
    return out


# --------------------------------------------------------------------------- mix_weights

@torch.no_grad()
def mix_weights(pretrained: torch.Tensor, finetuned: torch.Tensor, rho: float, *, seed: int = 0,
                key: str = "", select: str = "random", out: torch.Tensor | None = None,
                backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """Fine-mixing: ``pretrained + m ⊙ (finetuned − pretrained)`` keeping a share ``rho`` of the
    fine-tuned coordinates.

    ``select="random"``: ``m_i ~ Bernoulli(rho)`` from Philox keyed by ``(seed, key, i)`` (see
    :mod:`purify_fast.reference.weight_space`); every backend gives the same bits. Use the
    parameter name as ``key`` so each tensor draws its own mask.
    ``select="magnitude"``: keep the ``round(rho·N)`` coordinates of largest ``|δ|`` (ties at the
    threshold are all kept; none when ``round(rho·N)`` is 0).
    The result is a select, never an arithmetic blend, so kept coordinates equal ``finetuned``
    exactly. Neither a mask nor a random tensor is materialised. ``seed``: an integer in
    ``[0, 2**32)`` (Python, NumPy or a 0-d integer tensor; not a bool). ``out`` may be
    ``pretrained`` or ``finetuned`` itself, but not a tensor partly overlapping either.
    """
    _check_pair(pretrained, finetuned)
    rho = _check_rho(rho)
    if select not in _SELECT_MODES:
        raise ValueError(f"select must be one of {_SELECT_MODES}, got {select!r}")
    seed = _check_seed(seed)
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (e.g. the parameter name), got {type(key).__name__}")
    out = _check_out(out, pretrained)
    _check_no_partial_overlap(out, "out", pretrained, "pretrained")
    _check_no_partial_overlap(out, "out", finetuned, "finetuned")
    if check_finite:
        _check_finite(pretrained, "pretrained")
        _check_finite(finetuned, "finetuned")
    if select == "magnitude":
        hist = score_histogram(pretrained, finetuned, None, indicator="drift", backend=backend,
                               check_finite=False)
        thr = select_threshold(hist, rho)
        if not thr.exact:
            hist = score_histogram(pretrained, finetuned, None, indicator="drift", hist=thr.refine(),
                                   backend=backend, check_finite=False)
            thr = select_threshold(hist, rho)
        return _select(pretrained, finetuned, None, "drift", 1.0, thr.value, True, out, backend,
                       none_selected=thr.target == 0)

    name = _backend.resolve(backend, pretrained.device, pretrained.dtype)
    pre, ft = _flat(pretrained), _flat(finetuned)
    key_word, keep = ref.key_hash(key), ref.philox_keep_threshold(rho)
    if name == "torch":
        def run(o):
            for a, b in _chunks(o.numel()):
                o[a:b].copy_(ref.mix_random(pre[a:b], ft[a:b], seed, key_word, keep, offset=a))
        return _write_result(out, run)
    kern = _backend.module(name)
    return _write_result(out, lambda o: kern.mix_random(pre, ft, o, seed, key_word, keep))


# --------------------------------------------------------------------------- fisher

@torch.no_grad()
def fisher_accumulate_(acc: torch.Tensor, grad: torch.Tensor, *, scale: float = 1.0,
                       backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """``acc += scale · grad²`` in place (the diagonal Fisher / Hessian estimate).

    ``acc`` must be fp32 and contiguous; ``grad`` may be fp32, fp16 or bf16 of the same shape,
    and may be ``acc`` itself but not partly overlap it in memory.
    """
    _check_tensor(acc, "acc")
    _check_tensor(grad, "grad")
    if acc.dtype != torch.float32:
        raise TypeError(f"acc must be float32 (the accumulator), got {acc.dtype}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous (it is updated in place)")
    if grad.shape != acc.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match acc shape {tuple(acc.shape)}")
    if grad.device != acc.device:
        raise ValueError(f"grad is on {grad.device} but acc is on {acc.device}")
    _check_no_partial_overlap(acc, "acc", grad, "grad")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if check_finite:
        _check_finite(grad, "grad")
    name = _backend.resolve(backend, acc.device, grad.dtype)
    if name == "torch":
        ref.fisher_accumulate_(acc, grad, scale)
    else:
        _backend.module(name).fisher_accumulate_(acc.view(-1), _flat(grad), scale)
    return acc


# --------------------------------------------------------------------------- scoring + threshold

@dataclass
class ScoreHistogram:
    """Counts of score bit patterns over any number of tensors (one radix-select level).

    ``prefix == -1``: level 1, bins are the high 16 bits of the fp32 score. Otherwise level 2:
    bins are the low 16 bits of scores whose high 16 bits equal ``prefix``; ``above`` counts the
    scores in higher level-1 bins and ``total`` is N over all tensors of the pass.
    """

    indicator: str
    eps: float
    counts: torch.Tensor = field(repr=False)
    prefix: int = -1
    above: int = 0
    total: int = 0

    def refine(self) -> "ScoreHistogram":  # pragma: no cover - only Threshold.refine makes one
        raise TypeError("call Threshold.refine() to start a level-2 pass")


@dataclass(frozen=True)
class Threshold:
    """Result of :func:`select_threshold`: coordinates with ``score >= value`` are selected.

    ``exact`` means ``selected`` equals ``target`` up to exact ties at ``value``; when it is False,
    run the same tensors once more through :func:`score_histogram` with ``hist=thr.refine()`` and
    select again (two passes always suffice).
    """

    value: float
    selected: int
    target: int
    total: int
    exact: bool
    indicator: str
    eps: float
    _prefix: int = -1
    _above: int = 0

    @property
    def reset_value(self) -> float:
        """The threshold :func:`reset_by_score` applies: ``value``, but never below the smallest
        *normal* fp32, ``2**-126`` (about 1.18e-38). A zero score (no drift; ``H = 0`` under
        ``product``) is no evidence, and when ``rho`` reaches into the zero scores, taking every
        tie at 0 would reset all of them, far more than the ``rho`` share. Positive subnormal
        scores (below ``2**-126``) are treated like zero and are not reset either."""
        # The smallest *normal* float: a denormal threshold would be flushed to 0 under
        # torch.set_flush_denormal(True) and select every zero score again.
        return max(self.value, float(torch.finfo(torch.float32).smallest_normal))

    def refine(self) -> ScoreHistogram:
        if self.exact:
            raise ValueError("this threshold is already exact; no refinement pass needed")
        return ScoreHistogram(self.indicator, self.eps, torch.zeros(NUM_BINS, dtype=torch.int64),
                              prefix=self._prefix, above=self._above, total=self.total)


@torch.no_grad()
def score_histogram(pretrained: torch.Tensor, finetuned: torch.Tensor,
                    hessian: torch.Tensor | None = None, *, indicator: str = "drift_over_hessian",
                    eps: float = 1e-8, hist: ScoreHistogram | None = None,
                    backend: str | None = None, check_finite: bool = True) -> ScoreHistogram:
    """Accumulate the histogram of per-coordinate scores of one tensor into ``hist``.

    Call it for every tensor of the model (same ``hist``), then :func:`select_threshold`. The
    scores themselves are never stored. Indicators: ``drift_over_hessian`` δ²/(H+ε) (default),
    ``drift`` |δ|, ``inv_hessian`` 1/(H+ε), ``product`` δ²·H.
    """
    _check_pair(pretrained, finetuned)
    hessian = _check_hessian(hessian, pretrained, indicator)
    eps = _check_eps(eps)
    if hist is None:
        hist = ScoreHistogram(indicator, eps, torch.zeros(NUM_BINS, dtype=torch.int64))
    elif not isinstance(hist, ScoreHistogram):
        raise TypeError(f"hist must be a ScoreHistogram or None, got {type(hist).__name__}")
    elif hist.indicator != indicator or hist.eps != eps:
        raise ValueError(f"hist was built with indicator={hist.indicator!r}, eps={hist.eps}; "
                         f"got indicator={indicator!r}, eps={eps}")
    if not (isinstance(hist.counts, torch.Tensor) and hist.counts.dtype == torch.int64
            and hist.counts.shape == (NUM_BINS,)):
        got = (f"{hist.counts.dtype} {tuple(hist.counts.shape)}"
               if isinstance(hist.counts, torch.Tensor) else type(hist.counts).__name__)
        raise TypeError(f"hist.counts must be an int64 tensor of shape ({NUM_BINS},), got {got}")
    if check_finite:
        _check_finite(pretrained, "pretrained")
        _check_finite(finetuned, "finetuned")
    if hessian is not None:
        _check_hessian_values(hessian, check_finite)
    name = _backend.resolve(backend, pretrained.device, pretrained.dtype)
    code = ref.INDICATORS[indicator]
    pre, ft, h = _flat(pretrained), _flat(finetuned), _flat_hessian(hessian)
    counts = hist.counts.to(pretrained.device)
    if name == "torch":
        for a, b in _chunks(pre.numel()):
            ref.score_histogram(pre[a:b], ft[a:b], None if h is None else h[a:b], code, eps,
                                counts, hist.prefix)
    else:
        _backend.module(name).score_histogram(pre, ft, h, code, eps, counts, hist.prefix)
    hist.counts = counts
    if hist.prefix < 0:
        hist.total += pretrained.numel()
    return hist


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def select_threshold(hist: ScoreHistogram, rho: float) -> Threshold:
    """The score above which the top ``rho`` share of all histogrammed coordinates lies.

    Selected = ``score >= value``; the target count is ``round(rho · N)``. A level-1 histogram
    gives the answer directly when the boundary bin splits cleanly; otherwise the returned
    :class:`Threshold` has ``exact=False`` and :meth:`Threshold.refine` starts the second pass.
    """
    if not isinstance(hist, ScoreHistogram):
        raise TypeError(f"hist must be a ScoreHistogram, got {type(hist).__name__}")
    rho = _check_rho(rho)
    if hist.total == 0:
        raise ValueError("hist is empty: call score_histogram on at least one tensor first")
    target = int(round(rho * hist.total))
    common = dict(target=target, total=hist.total, indicator=hist.indicator, eps=hist.eps)
    if target == 0:
        return Threshold(math.inf, 0, exact=True, **common)
    counts = hist.counts.cpu()
    # Walk from the highest bin down: `before[b]` = count strictly above bin b.
    suffix = counts.flip(0).cumsum(0).flip(0)
    before = hist.above + suffix - counts
    # The boundary bin b holds the target-th largest score: before[b] < target <= before[b]+c[b].
    inside = (before < target) & (before + counts >= target)
    b = int(torch.nonzero(inside).max()) if bool(inside.any()) else 0
    n_before, n_bin = int(before[b]), int(counts[b])
    if hist.prefix < 0:
        if n_before + n_bin == target or n_bin == 0:
            return Threshold(_bits_to_float(b << 16), n_before + n_bin, exact=True, **common)
        return Threshold(_bits_to_float(b << 16), n_before + n_bin, exact=False,
                         _prefix=b, _above=n_before, **common)
    # Level 2: bin b is one exact fp32 value; every score equal to it is selected (ties).
    return Threshold(_bits_to_float((hist.prefix << 16) | b), n_before + n_bin, exact=True, **common)


def global_score_threshold(tensors: Callable[[], Iterable[tuple]], rho: float, *,
                           indicator: str = "drift_over_hessian", eps: float = 1e-8,
                           backend: str | None = None, check_finite: bool = True) -> Threshold:
    """One global threshold over many tensors: runs ``tensors()`` once, and a second time only if
    the boundary bin needs refining. ``tensors`` yields ``(pretrained, finetuned, hessian)``."""
    hist, seen = None, 0
    for pre, ft, h in tensors():
        hist = score_histogram(pre, ft, h, indicator=indicator, eps=eps, hist=hist,
                               backend=backend, check_finite=check_finite)
        seen += pre.numel()
    if hist is None:
        raise ValueError("tensors() yielded nothing")
    thr = select_threshold(hist, rho)
    if thr.exact:
        return thr
    hist, again = thr.refine(), 0
    for pre, ft, h in tensors():
        score_histogram(pre, ft, h, indicator=indicator, eps=eps, hist=hist, backend=backend,
                        check_finite=False)
        again += pre.numel()
    if again != seen:
        # A one-shot iterator (or a generator object instead of a function making one) comes back
        # empty the second time, and the refined threshold would be silently wrong.
        raise ValueError(f"tensors() must yield the same tensors on every call: {seen} scores "
                         f"the first time, {again} the second; pass a function that makes a new "
                         f"iterator, e.g. lambda: ((pre[k], ft[k], h[k]) for k in keys)")
    return select_threshold(hist, rho)


def _select(pre_t, ft_t, hessian, indicator, eps, threshold, takes_ft, out, backend, *,
            none_selected=False):
    name = _backend.resolve(backend, pre_t.device, pre_t.dtype)
    if none_selected:
        # A target of 0 has the threshold +inf, which `score >= threshold` still meets for an
        # infinite score (d*d overflowing, H + eps = 0): select nothing without scoring.
        return out.copy_(pre_t if takes_ft else ft_t)
    code = ref.INDICATORS[indicator]
    pre, ft, h = _flat(pre_t), _flat(ft_t), _flat_hessian(hessian)
    if name == "torch":
        def run(o):
            for a, b in _chunks(o.numel()):
                o[a:b].copy_(ref.select_by_score(pre[a:b], ft[a:b], None if h is None else h[a:b],
                                                 code, eps, threshold, takes_ft))
        return _write_result(out, run)
    kern = _backend.module(name)
    return _write_result(out, lambda o: kern.select_by_score(pre, ft, h, code, eps, threshold,
                                                             takes_ft, o))


@torch.no_grad()
def reset_by_score(pretrained: torch.Tensor, finetuned: torch.Tensor,
                   hessian: torch.Tensor | None, threshold: Threshold | float, *,
                   indicator: str | None = None, eps: float | None = None,
                   out: torch.Tensor | None = None, backend: str | None = None,
                   check_finite: bool = True) -> torch.Tensor:
    """Fine-purifying reset: coordinates with ``score >= threshold`` go back to ``pretrained``,
    the rest keep ``finetuned``; one pass, scores recomputed on the fly.

    Given a :class:`Threshold`, its indicator and eps are used (passing different ones is an
    error), a threshold of 0 resets only scores of at least ``2**-126``, the smallest normal fp32
    (zero and subnormal scores are never reset: :attr:`Threshold.reset_value`), and a target of 0
    (``rho = 0``) resets nothing, not even infinite scores; given a float, it is used as it is,
    ``indicator`` defaults to ``drift_over_hessian`` and ``eps`` to 1e-8. ``out`` may be
    ``pretrained`` or ``finetuned`` itself, but not a tensor partly overlapping an input.
    """
    if isinstance(threshold, Threshold):
        if indicator is not None and indicator != threshold.indicator:
            raise ValueError(f"indicator {indicator!r} differs from the threshold's "
                             f"{threshold.indicator!r}")
        if eps is not None and float(eps) != threshold.eps:
            raise ValueError(f"eps {eps} differs from the threshold's {threshold.eps}")
        indicator, eps, value = threshold.indicator, threshold.eps, threshold.reset_value
        none_selected = threshold.target == 0
    else:
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            raise TypeError(f"threshold must be a Threshold or a float, got {threshold!r}") from None
        if math.isnan(value):
            raise ValueError("threshold is NaN")
        indicator = indicator or "drift_over_hessian"
        eps = 1e-8 if eps is None else eps
        none_selected = False
    _check_pair(pretrained, finetuned)
    hessian = _check_hessian(hessian, pretrained, indicator)
    eps = _check_eps(eps)
    out = _check_out(out, pretrained)
    for read, read_name in ((pretrained, "pretrained"), (finetuned, "finetuned"),
                            (hessian, "hessian")):
        _check_no_partial_overlap(out, "out", read, read_name)
    if check_finite:
        _check_finite(pretrained, "pretrained")
        _check_finite(finetuned, "finetuned")
    if hessian is not None:
        _check_hessian_values(hessian, check_finite)
    return _select(pretrained, finetuned, hessian, indicator, eps, value, False, out, backend,
                   none_selected=none_selected)


# --------------------------------------------------------------------------- E-PUR

def check_drift_c(c) -> float:
    """E-PUR's ``c`` as a float, refused unless it stays finite and above 1 in fp32, where the
    kernels apply it: 1 + 1e-8 rounds to 1.0 there (log 0: inf/NaN scores) and 1e39 to inf."""
    c = float(c)
    c32 = torch.tensor(c, dtype=torch.float32).item() if math.isfinite(c) else c
    if not (c32 > 1.0 and math.isfinite(c32)):
        in32 = f" ({c32!r} in float32)" if c32 != c and not math.isnan(c) else ""
        raise ValueError(f"c must be a finite number > 1 (log(c) must be positive), got {c!r}"
                         f"{in32}")
    return c


@torch.no_grad()
def embedding_drift_scores(pretrained_emb: torch.Tensor, finetuned_emb: torch.Tensor,
                           token_freqs: torch.Tensor, *, c: float = 20.0,
                           backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """E-PUR score per vocabulary row: ``‖E_ft[i] − E_pre[i]‖₂ / log(max(f_i, c))`` (fp32, [V]).

    Rows that drifted far more than their clean-corpus frequency explains score high.
    ``c`` > 1 keeps the log positive for rare tokens (default 20); it is applied in fp32, so it
    must stay above 1 (and finite) once rounded to fp32.
    """
    _check_pair(pretrained_emb, finetuned_emb, ("pretrained_emb", "finetuned_emb"))
    if pretrained_emb.dim() != 2:
        raise ValueError(f"pretrained_emb must be 2-D [vocab, dim], got shape "
                         f"{tuple(pretrained_emb.shape)}")
    if not isinstance(token_freqs, torch.Tensor):
        raise TypeError(f"token_freqs must be a torch.Tensor, got {type(token_freqs).__name__}")
    if token_freqs.shape != (pretrained_emb.shape[0],):
        raise ValueError(f"token_freqs must have shape ({pretrained_emb.shape[0]},) (one count per "
                         f"vocabulary row), got {tuple(token_freqs.shape)}")
    if token_freqs.device != pretrained_emb.device:
        raise ValueError(f"token_freqs is on {token_freqs.device} but pretrained_emb is on "
                         f"{pretrained_emb.device}")
    c = check_drift_c(c)
    freqs = token_freqs.to(torch.float32).contiguous()
    if bool((freqs < 0).any()) or not bool(torch.isfinite(freqs).all()):
        raise ValueError("token_freqs must be finite and non-negative")
    if check_finite:
        _check_finite(pretrained_emb, "pretrained_emb")
        _check_finite(finetuned_emb, "finetuned_emb")
    name = _backend.resolve(backend, pretrained_emb.device, pretrained_emb.dtype)
    pre, ft = pretrained_emb.contiguous(), finetuned_emb.contiguous()
    if name == "torch":
        return ref.embedding_drift_scores(pre, ft, freqs, c)
    out = torch.empty(pre.shape[0], dtype=torch.float32, device=pre.device)
    _backend.module(name).embedding_drift_scores(pre, ft, freqs, c, out)
    return out
