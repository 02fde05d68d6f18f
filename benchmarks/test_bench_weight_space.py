"""CPU benchmarks of the weight-space ops: C++/OpenMP kernels vs the torch reference vs eager PyTorch.

Each op is timed three ways on the same inputs:

* ``cpp``   purify_fast.ops with backend="cpp" (the compiled kernels, no temporaries);
* ``torch`` purify_fast.ops with backend="torch" (the readable reference, same results);
* ``eager`` how one would write the op in plain PyTorch: ``torch.rand(shape) < rho`` then
  ``torch.where`` for mixing; scores, ``torch.kthvalue`` and ``torch.where`` for the Fine-purifying
  score + reset pair; ``vector_norm`` for E-PUR; ``isfinite().all()`` for the finiteness check.

Every row reports the median time, GB/s over the bytes the op must move at minimum (the same byte
count for all three, so GB/s compare directly), the speed-up over eager and the peak extra memory
(see conftest.py for how it is measured). ``check_finite=False`` everywhere: the finiteness scan is
its own row (``all_finite``).
"""

from __future__ import annotations

import time

import pytest
import torch

from purify_fast import backend as _backend
from purify_fast import ops

USES_BENCH_OPTIONS = True
IMPLS = ["eager", "cpp", "torch"]
RHO_MIX = 0.5
RHO_RESET = 0.1
EMB_DIM = 4096  # LLaMA-7B hidden size: E-PUR rows are [vocab, 4096]

pytestmark = pytest.mark.skipif("cpp" not in _backend.available("cpu"),
                                reason="purify_fast._C (cpp backend) is not built")


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_timing_mode() -> None:
    """glibc's steady state after large frees (mmap threshold risen to its 32 MiB cap, heap kept):
    fixed explicitly so every implementation is timed under the same allocator behaviour."""
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _malloc_measuring_mode() -> bool:
    """Every buffer >= 128 KiB mmap'd and handed back on free, so a call's temporaries show in
    its peak RSS instead of being served from (already resident) recycled heap memory."""
    ok = _mallopt(_M_MMAP_THRESHOLD, 128 << 10) and _mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    try:  # free heap chunks are resident: give them back so reusing them counts again
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return ok


_malloc_timing_mode()


def peak_extra_bytes(fn) -> int | None:
    """Peak resident bytes one call of ``fn`` added beyond what existed before it, minus the bytes
    of the tensor it returns (if any). None where the OS counter is unavailable.

    Linux keeps the peak RSS of a process (``VmHWM``); writing "5" to ``/proc/self/clear_refs``
    resets it to the current RSS. So: reset, run once, and ``VmHWM - VmRSS(before)`` is the most
    memory the call ever had resident beyond what already existed (inputs, accumulators). A result
    tensor the call returns is subtracted, leaving the working memory beyond the output.
    tracemalloc cannot see torch's allocations and torch keeps no CPU allocator statistics, hence
    the OS counter; glibc is switched to mmap every buffer >= 128 KiB for this one call (see
    ``_malloc_measuring_mode``) and back to the timing setting afterwards.
    """
    if not _malloc_measuring_mode():
        return None
    try:
        before = _status_bytes("VmRSS")
        if before is None or not _reset_peak():
            return None
        result = fn()
        peak = _status_bytes("VmHWM")
        out_bytes = result.numel() * result.element_size() if isinstance(result, torch.Tensor) else 0
        del result
        return max(0, peak - before - out_bytes)
    finally:
        _malloc_timing_mode()


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_cache: dict = {}


def _inputs(kind: str, size: int, dtype: torch.dtype) -> dict:
    """Inputs shared by the three implementations of one (op, size, dtype); the previous set is
    dropped first so only one lives at a time."""
    key = (kind, size, dtype)
    if key not in _cache:
        _cache.clear()
        g = torch.Generator().manual_seed(size)
        pre = torch.randn(size, generator=g).to(dtype)
        ft = (pre.float() + 0.01 * torch.randn(size, generator=g)).to(dtype)
        d = dict(pre=pre, ft=ft)
        if kind == "score":
            d["h"] = torch.rand(size, generator=g) * torch.rand(size, generator=g)
        if kind == "fisher":
            d = dict(acc=torch.zeros(size), grad=ft)
        if kind == "embed":
            rows = max(1, size // EMB_DIM)
            d = dict(pre=pre[: rows * EMB_DIM].view(rows, EMB_DIM),
                     ft=ft[: rows * EMB_DIM].view(rows, EMB_DIM),
                     freqs=torch.randint(0, 100_000, (rows,), generator=g).float())
        _cache[key] = d
    return _cache[key]


def _mix(impl, x):
    if impl == "eager":
        return lambda: torch.where(torch.rand(x["pre"].shape) < RHO_MIX, x["ft"], x["pre"])
    return lambda: ops.mix_weights(x["pre"], x["ft"], RHO_MIX, seed=1, key="layers.0.mlp.up_proj",
                                   backend=impl, check_finite=False)


def _fisher(impl, x):
    if impl == "eager":
        def run():
            x["acc"].add_(x["grad"].float().pow(2), alpha=0.5)
        return run

    def run():
        ops.fisher_accumulate_(x["acc"], x["grad"], scale=0.5, backend=impl, check_finite=False)
    return run


def _score_reset(impl, x):
    pre, ft, h = x["pre"], x["ft"], x["h"]
    n = pre.numel()
    if impl == "eager":
        def run():
            s = (ft.float() - pre.float()).pow(2) / (h + 1e-8)
            k = n - int(round(RHO_RESET * n)) + 1  # the target-th largest = k-th smallest
            thr = torch.kthvalue(s, k).values
            return torch.where(s >= thr, pre, ft)
        return run

    def run():
        thr = ops.global_score_threshold(lambda: [(pre, ft, h)], RHO_RESET, backend=impl,
                                         check_finite=False)
        return ops.reset_by_score(pre, ft, h, thr, backend=impl, check_finite=False)
    return run


def _embed(impl, x):
    if impl == "eager":
        return lambda: (torch.linalg.vector_norm(x["ft"].float() - x["pre"].float(), dim=1)
                        / torch.log(x["freqs"].clamp(min=20.0)))
    return lambda: ops.embedding_drift_scores(x["pre"], x["ft"], x["freqs"], backend=impl,
                                              check_finite=False)


def _finite(impl, x):
    if impl == "eager":
        return lambda: bool(torch.isfinite(x["pre"]).all())
    if impl == "cpp":
        mod = _backend.module("cpp")
        return lambda: mod.all_finite(x["pre"])
    return None  # the torch reference *is* the eager formulation


# op name -> (input kind, builder, minimal bytes moved for (n, element size))
OPS = {
    "mix_weights": ("mix", _mix, lambda n, es: 3 * n * es),
    "fisher_accumulate_": ("fisher", _fisher, lambda n, es: n * es + 8 * n),
    # one histogram pass (pre, ft, H) + the reset pass (pre, ft, H read; out written)
    "score+reset": ("score", _score_reset, lambda n, es: 2 * (2 * n * es + 4 * n) + n * es),
    "embedding_drift_scores": ("embed", _embed, lambda n, es: 2 * n * es + 8 * (n // EMB_DIM)),
    "all_finite": ("mix", _finite, lambda n, es: n * es),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_weight_space_cpu(benchmark, records, ref_max, op, impl, size, dtype):
    kind, build, nbytes_of = OPS[op]
    if impl == "torch" and size > ref_max:
        pytest.skip(f"torch reference only timed up to --bench-ref-max={ref_max} elements")
    x = _inputs(kind, size, dtype)
    fn = build(impl, x)
    if fn is None:
        pytest.skip(f"{op} has no separate {impl} implementation")
    n = x["pre"].numel() if "pre" in x else x["acc"].numel()
    nbytes = nbytes_of(n, torch.empty(0, dtype=dtype).element_size())

    first = time_call(fn)  # warm-up (first-touch, thread pool start)
    extra = peak_extra_bytes(fn)
    rounds = int(min(20, max(3, 2.0 / max(first, 1e-6))))
    benchmark.group = f"{op} {str(dtype).replace('torch.', '')} n={n}"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else time_call(fn)
    ratio = records.add(op, dtype, n, impl, median, nbytes, extra)
    benchmark.extra_info.update(
        impl=impl, bytes_moved=nbytes, gb_per_s=round(nbytes / median / 1e9, 3),
        peak_extra_mib=None if extra is None else round(extra / 2**20, 2),
        speedup_vs_eager=None if ratio is None else round(ratio, 3))
