#!/usr/bin/env python
"""One command for a (bare) GPU machine: build, check and time every kernel, write a table.

    python benchmarks/gpu_suite.py [--models 7b,8b,70b] [--ops all] [--out RESULTS_gpu.md]

Steps (each can be skipped):

1. build: ``pip install --no-build-isolation --no-deps -e .`` (no network needed; falls back to
   ``python setup.py build_ext --inplace``), which compiles purify_fast._C and purify_fast._C_cuda;
2. tests: ``python -m pytest tests -q`` when pytest is installed (the CUDA cases run there);
3. self-check: every timed backend against the torch reference on small CUDA tensors (bit-exact
   masks, histograms and selections), so a machine without pytest still checks what it times;
4. timing: every op on ``eager`` PyTorch, ``triton`` and ``cuda`` at LLaMA-7B / 8B / 70B layer
   shapes (bf16 by default) with ``triton.testing.do_bench`` (median; CUDA-event loop fallback),
   against the device-to-device copy bandwidth measured first (the ceiling for these streaming
   ops), written as a markdown table + JSON: median ms, GB/s over the minimal bytes moved, % of copy
   bandwidth, speed-up over eager.

Ops live in ``OPS`` (a list of :class:`OpSpec`); another op family adds itself with
:func:`register_op` (inputs builder, one callable per implementation, bytes moved).

It needs a CUDA device to time anything; ``--dry-run`` only checks the arguments and prints the
plan (that is all it can do on a CPU-only machine).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # a bare machine may not have the package installed yet: import it from the checkout
    import purify_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

# LLaMA layer shapes: (hidden, intermediate, vocab). The timed tensors are one MLP up-projection
# [intermediate, hidden] (the largest per-layer matrix) and the token embedding [vocab, hidden].
MODELS = {
    "7b": dict(name="LLaMA-2-7B", hidden=4096, intermediate=11008, vocab=32000),
    "8b": dict(name="LLaMA-3-8B", hidden=4096, intermediate=14336, vocab=128256),
    "70b": dict(name="LLaMA-3-70B", hidden=8192, intermediate=28672, vocab=128256),
}
IMPLS = ("eager", "triton", "cuda")
# The GPU cases of the test suite: the rest needs the offline model and corpora, which a bare
# device machine lacks.
DEFAULT_PYTEST_ARGS = "-k 'cuda or triton or gpu'"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class OpSpec:
    """One timed op. ``inputs(model, dtype, device)`` builds the tensors; ``impls[name](x)`` returns
    a zero-argument callable (or None when that implementation does not exist); ``nbytes(x)`` is
    the minimal traffic in bytes; ``shape(x)`` a label for the table."""

    name: str
    inputs: Callable[[dict, object, object], dict]
    impls: dict[str, Callable[[dict], Callable[[], object] | None]]
    nbytes: Callable[[dict], int]
    shape: Callable[[dict], str] = field(default=lambda x: "x".join(map(str, x["pre"].shape)))


OPS: list[OpSpec] = []


def register_op(spec: OpSpec) -> OpSpec:
    if any(s.name == spec.name for s in OPS):
        raise ValueError(f"op {spec.name!r} is already registered")
    OPS.append(spec)
    return spec


# ---------------------------------------------------------------------------- weight-space ops

RHO_MIX, RHO_RESET, EPS = 0.5, 0.1, 1e-8


def _es(t) -> int:
    return t.element_size()


def _layer_pair(model, dtype, device):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    shape = (model["intermediate"], model["hidden"])
    pre = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    ft = (pre.float() + 0.01 * torch.randn(shape, generator=g, device=device)).to(dtype)
    h = torch.rand(shape, generator=g, device=device) * torch.rand(shape, generator=g, device=device)
    return dict(pre=pre, ft=ft, h=h)


def _embedding(model, dtype, device):
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    shape = (model["vocab"], model["hidden"])
    pre = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    ft = (pre.float() + 0.01 * torch.randn(shape, generator=g, device=device)).to(dtype)
    freqs = torch.randint(0, 100_000, (shape[0],), generator=g, device=device).float()
    return dict(pre=pre, ft=ft, freqs=freqs)


def _kernel_impl(fn_of_backend):
    """impls dict for the two compiled backends from fn_of_backend(backend, x)."""
    return {name: (lambda x, _n=name: fn_of_backend(_n, x)) for name in ("triton", "cuda")}


def _eager_scores(x):
    return (x["ft"].float() - x["pre"].float()).pow(2) / (x["h"] + EPS)


def _register_weight_space_ops():
    import torch

    from purify_fast import ops

    def mix(backend, x):
        return lambda: ops.mix_weights(x["pre"], x["ft"], RHO_MIX, seed=1, key="mlp.up_proj",
                                       backend=backend, check_finite=False)

    register_op(OpSpec(
        "mix_weights", _layer_pair,
        {"eager": lambda x: lambda: torch.where(torch.rand(x["pre"].shape, device=x["pre"].device)
                                                < RHO_MIX, x["ft"], x["pre"]),
         **_kernel_impl(mix)},
        lambda x: 3 * x["pre"].numel() * _es(x["pre"])))

    def fisher_inputs(model, dtype, device):
        x = _layer_pair(model, dtype, device)
        return dict(pre=x["ft"], acc=torch.zeros(x["ft"].shape, device=device))

    def fisher(backend, x):
        return lambda: ops.fisher_accumulate_(x["acc"], x["pre"], scale=0.5, backend=backend,
                                              check_finite=False)

    register_op(OpSpec(
        "fisher_accumulate_", fisher_inputs,
        {"eager": lambda x: lambda: x["acc"].add_(x["pre"].float().pow(2), alpha=0.5),
         **_kernel_impl(fisher)},
        lambda x: x["pre"].numel() * (_es(x["pre"]) + 8)))

    def hist(backend, x):
        return lambda: ops.score_histogram(x["pre"], x["ft"], x["h"], backend=backend,
                                           check_finite=False)

    def hist_eager(x):
        def run():
            bits = _eager_scores(x).view(torch.int32) >> 16
            return torch.bincount(bits.flatten(), minlength=1 << 16)
        return run

    register_op(OpSpec(
        "score_histogram", _layer_pair, {"eager": hist_eager, **_kernel_impl(hist)},
        lambda x: x["pre"].numel() * (2 * _es(x["pre"]) + 4)))

    def reset(backend, x):
        return lambda: ops.reset_by_score(x["pre"], x["ft"], x["h"], 1.0, backend=backend,
                                          check_finite=False)

    register_op(OpSpec(
        "reset_by_score", _layer_pair,
        {"eager": lambda x: lambda: torch.where(_eager_scores(x) >= 1.0, x["pre"], x["ft"]),
         **_kernel_impl(reset)},
        lambda x: x["pre"].numel() * (3 * _es(x["pre"]) + 4)))

    def pair(backend, x):
        def run():
            thr = ops.global_score_threshold(lambda: [(x["pre"], x["ft"], x["h"])], RHO_RESET,
                                             backend=backend, check_finite=False)
            return ops.reset_by_score(x["pre"], x["ft"], x["h"], thr, backend=backend,
                                      check_finite=False)
        return run

    def pair_eager(x):
        def run():
            s = _eager_scores(x).flatten()
            n = s.numel()
            thr = torch.kthvalue(s, n - int(round(RHO_RESET * n)) + 1).values
            return torch.where(s.view(x["pre"].shape) >= thr, x["pre"], x["ft"])
        return run

    register_op(OpSpec(
        "score+reset", _layer_pair, {"eager": pair_eager, **_kernel_impl(pair)},
        lambda x: x["pre"].numel() * (2 * (2 * _es(x["pre"]) + 4) + _es(x["pre"]))))

    def embed(backend, x):
        return lambda: ops.embedding_drift_scores(x["pre"], x["ft"], x["freqs"], backend=backend,
                                                  check_finite=False)

    register_op(OpSpec(
        "embedding_drift_scores", _embedding,
        {"eager": lambda x: lambda: (torch.linalg.vector_norm(x["ft"].float() - x["pre"].float(),
                                                              dim=1)
                                     / torch.log(x["freqs"].clamp(min=20.0))),
         **_kernel_impl(embed)},
        lambda x: 2 * x["pre"].numel() * _es(x["pre"]) + 8 * x["pre"].shape[0]))

    def finite(backend, x):
        from purify_fast import backend as _backend

        mod = _backend.module(backend)
        if not hasattr(mod, "all_finite"):
            return None
        return lambda: mod.all_finite(x["pre"].view(-1))

    register_op(OpSpec(
        "all_finite", _layer_pair,
        {"eager": lambda x: lambda: bool(torch.isfinite(x["pre"]).all()), **_kernel_impl(finite)},
        lambda x: x["pre"].numel() * _es(x["pre"])))


# ---------------------------------------------------------------------------- steps

def build(log) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    log(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stdout[-3000:] + proc.stderr[-3000:])
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        log(f"pip install failed; $ {' '.join(cmd)}")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            log(proc.stdout[-3000:] + proc.stderr[-3000:])
            return False
    log("build ok")
    return True


def run_tests(log, pytest_args: list[str], timeout: int) -> str:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "skipped (pytest is not installed here; the self-check below still runs)"
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    if not any(not a.startswith("-") and Path(ROOT, a.split("::")[0]).exists()
               for a in pytest_args):
        cmd.insert(3, "tests")  # no test path given: the whole tests/ directory
    if importlib.util.find_spec("pytest_benchmark") is None:
        # pyproject's addopts carry --benchmark-disable, which plain pytest rejects.
        cmd[4:4] = ["-o", "addopts=-ra"]
    log(f"$ {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    out = (proc.stdout + proc.stderr).strip().splitlines()
    failures = [line for line in out if line.startswith(("FAILED", "ERROR"))]
    # CUDA / Triton failures first: missing offline data (MiniLM, corpora) on a bare machine
    # fails other tests, which must not hide them
    failures.sort(key=lambda line: not any(w in line.lower() for w in ("cuda", "triton", "gpu")))
    for line in failures[:40]:
        log("  " + line)
    return (out[-1] if out else "no output") + f" (exit {proc.returncode})"


def self_check(backends: list[str], log, device: str = "cuda") -> dict[str, str]:
    """Small inputs on ``device`` through every backend vs the torch reference; returns
    backend -> verdict. (Runs on "cpu" with the cpp backend too, which is how CI checks it.)"""
    import torch

    from purify_fast import ops

    torch.manual_seed(0)
    verdict = {}
    for backend in backends:
        problems = []
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            pre = torch.randn(5, 12345, device=device).to(dtype)
            ft = (pre.float() + 0.1 * torch.randn(pre.shape, device=device)).to(dtype)
            h = torch.rand(pre.shape, device=device)
            for rho in (0.0, 0.3, 1.0):
                a = ops.mix_weights(pre, ft, rho, seed=7, key="k", backend=backend)
                b = ops.mix_weights(pre, ft, rho, seed=7, key="k", backend="torch")
                if not torch.equal(a, b):
                    problems.append(f"mix {dtype} rho={rho}")
            for ind in ops.INDICATORS:
                hh = None if ind == "drift" else h
                ha = ops.score_histogram(pre, ft, hh, indicator=ind, backend=backend)
                hb = ops.score_histogram(pre, ft, hh, indicator=ind, backend="torch")
                if not torch.equal(ha.counts.cpu(), hb.counts.cpu()):
                    problems.append(f"histogram {dtype} {ind}")
                thr = ops.select_threshold(hb, 0.2)
                ra = ops.reset_by_score(pre, ft, hh, thr.value, indicator=ind, backend=backend)
                rb = ops.reset_by_score(pre, ft, hh, thr.value, indicator=ind, backend="torch")
                if not torch.equal(ra, rb):
                    problems.append(f"reset {dtype} {ind}")
            acc_a = torch.rand(pre.shape, device=device)
            acc_b = acc_a.clone()
            ops.fisher_accumulate_(acc_a, ft, scale=0.3, backend=backend)
            ops.fisher_accumulate_(acc_b, ft, scale=0.3, backend="torch")
            if not torch.allclose(acc_a, acc_b, rtol=1e-6, atol=0):
                problems.append(f"fisher {dtype}")
            freqs = torch.randint(0, 1000, (pre.shape[0],), device=device).float()
            ea = ops.embedding_drift_scores(pre, ft, freqs, backend=backend)
            eb = ops.embedding_drift_scores(pre.double(), ft.double(), freqs, backend="torch")
            # the reference returns fp32 scores even from fp64 inputs
            if not torch.allclose(ea.double(), eb.double(), rtol=1e-5, atol=0):
                problems.append(f"embedding {dtype}")
            # the fused multi-scale LoRA forward (both scalings) vs its reference, fp32 products
            x = torch.randn(37, 96, device=device).to(dtype)
            w = (torch.randn(80, 96, device=device) / 10).to(dtype)
            bias = torch.randn(80, device=device).to(dtype)
            lo = (torch.randn(8, 96, device=device) / 10).to(dtype)
            ro = (torch.randn(80, 8, device=device) / 3).to(dtype)
            for mode in ("radial", "fft"):
                ya = ops.multiscale_lora(x, w, bias, lo, ro, [1, 2, 4, 8], 6.0, mode=mode,
                                         backend=backend)
                yb = ops.multiscale_lora(x.double(), w.double(), bias.double(), lo.double(),
                                         ro.double(), [1, 2, 4, 8], 6.0, mode=mode,
                                         backend="torch")
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                if not torch.allclose(ya.double(), yb, rtol=tol, atol=tol):
                    problems.append(f"multiscale_lora {mode} {dtype}")
        verdict[backend] = "ok" if not problems else "MISMATCH: " + ", ".join(problems)
        log(f"self-check {backend}: {verdict[backend]}")
    return verdict


def make_timer(kind: str, warmup_ms: int, rep_ms: int):
    import torch

    def events(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6) * 1e3
        n_warm = max(1, int(warmup_ms / est))
        n_rep = max(5, int(rep_ms / est))
        for _ in range(n_warm):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        return times[len(times) // 2]

    if kind == "events":
        return events
    try:
        from triton.testing import do_bench
    except ImportError:
        return events

    def bench(fn) -> float:
        try:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except TypeError:  # older triton without return_mode
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])[0])
    return bench


def copy_bandwidth(timer, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s (read + write counted) on an nbytes buffer."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_ops(models, op_names, impls, dtype_name, timer, copy_gbps, log) -> list[dict]:
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    rows = []
    for key in models:
        model = MODELS[key]
        for spec in OPS:
            if spec.name not in op_names:
                continue
            x = spec.inputs(model, dtype, "cuda")
            nbytes = spec.nbytes(x)
            eager_ms = None
            for impl in impls:
                builder = spec.impls.get(impl)
                try:
                    fn = builder(x) if builder is not None else None
                    if fn is None:
                        continue
                    ms = timer(fn)
                except Exception as exc:  # noqa: BLE001 - one failing cell must not end the run
                    log(f"{model['name']} {spec.name} {impl}: FAILED {type(exc).__name__}: {exc}")
                    rows.append(dict(model=model["name"], op=spec.name, shape=spec.shape(x),
                                     impl=impl, ms=math.nan, error=str(exc)[:200]))
                    continue
                if impl == "eager":
                    eager_ms = ms
                gbps = nbytes / (ms * 1e-3) / 1e9
                row = dict(model=model["name"], op=spec.name, shape=spec.shape(x), impl=impl,
                           ms=ms, gbps=gbps, pct_copy=100.0 * gbps / copy_gbps,
                           speedup=(eager_ms / ms) if eager_ms else None, bytes=nbytes)
                rows.append(row)
                log(f"{row['model']:<12} {row['op']:<24} {impl:<7} {ms:9.3f} ms {gbps:8.1f} GB/s "
                    f"{row['pct_copy']:5.1f}% copy" + (f"  {row['speedup']:.2f}x eager"
                                                       if row["speedup"] else ""))
            del x
            torch.cuda.empty_cache()
    return rows


def markdown(rows, header: list[str]) -> str:
    lines = [*header, "",
             "| model | op | shape | impl | median ms | GB/s | % of copy BW | speed-up vs eager |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if math.isnan(r["ms"]):
            lines.append(f"| {r['model']} | {r['op']} | {r['shape']} | {r['impl']} | failed | | | |")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ("1.00x" if r["impl"] == "eager" else "n/a")
        lines.append(f"| {r['model']} | {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.1f} | {r['pct_copy']:.1f} | {sp} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI

def _csv(choices: list[str], what: str):
    def parse(text: str) -> list[str]:
        items = [s.strip().lower() for s in text.split(",") if s.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from "
                                             f"{', '.join(choices)} or 'all'")
        return items
    return parse


def _register_all_ops():
    _register_weight_space_ops()
    # MuScleLoRA's fused forward; its benchmark module owns the eager formulations it is compared
    # with, so the GPU suite and the pytest-benchmark file time the very same code.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import test_bench_multiscale_lora

    test_bench_multiscale_lora.register_gpu_ops(register_op, OpSpec)
    # MIMIC's attention-map loss (forward + backward: it runs every training step)
    import test_bench_attention_maps

    test_bench_attention_maps.register_gpu_ops(register_op, OpSpec)


def parse_args(argv=None) -> argparse.Namespace:
    if not OPS:
        _register_all_ops()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(list(MODELS), "model"), default=list(MODELS),
                   help="comma list of LLaMA presets (7b, 8b, 70b) or 'all' (default all)")
    p.add_argument("--ops", type=_csv([s.name.lower() for s in OPS], "op"),
                   default=[s.name.lower() for s in OPS], help="comma list of ops or 'all'")
    p.add_argument("--impls", type=_csv(list(IMPLS), "implementation"), default=list(IMPLS),
                   help="comma list among eager, triton, cuda (default all)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--timer", choices=["do_bench", "events"], default="do_bench")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-timeout", type=int, default=300,
                   help="seconds for pytest (default 300: a device call may last 600 s in all)")
    p.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS,
                   help="arguments for pytest, one shell-quoted string (default: the tests "
                        f"whose names say cuda / triton / gpu: {DEFAULT_PYTEST_ARGS!r}); "
                        "a test path among them replaces tests/")
    p.add_argument("--out", default=str(Path(os.environ["OUT"]) / "RESULTS_gpu.md")
                   if os.environ.get("OUT") else str(ROOT / "benchmarks" / "RESULTS_gpu.md"),
                   help="markdown table path (a .json with the raw rows and a .log written as "
                        "the run goes go next to it; default $OUT/RESULTS_gpu.md when $OUT is "
                        "set, as on the device machine, so they come back)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the plan; needs no GPU")
    args = p.parse_args(argv)
    if args.warmup_ms < 0 or args.rep_ms <= 0:
        p.error("--warmup-ms must be >= 0 and --rep-ms > 0")
    if "eager" not in args.impls:
        args.impls = ["eager", *args.impls]  # the speed-up column needs the eager baseline
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir():
        p.error(f"--out: directory {out_dir} does not exist")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    lines: list[str] = []
    log_path = Path(args.out).with_suffix(".log")

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)
        if not args.dry_run:  # written as the run goes: a killed run still leaves its log
            with open(log_path, "a") as fh:
                fh.write(msg + "\n")

    plan = (f"models={','.join(args.models)} ops={','.join(args.ops)} impls={','.join(args.impls)} "
            f"dtype={args.dtype} timer={args.timer} out={args.out}")
    if args.dry_run:
        print("dry run: " + plan)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: torch sees no CUDA device; nothing to time (use --dry-run to check "
              "arguments)", file=sys.stderr)
        return 2
    log(plan)
    if not args.skip_build:
        cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
        if not (cuda_home / "include" / "cusparse.h").exists():
            log(f"note: {cuda_home}/include/cusparse.h is missing; torch's CUDA headers include "
                f"it, so the CUDA extension build may fail")
        if not build(log):
            log("build failed: no kernel backend to time; see the log above")
            return 3
        # The backends were probed (and cached) when the ops registered, before the build, and
        # an editable install is only seen by a new interpreter: carry on in one.
        log("continuing in a fresh interpreter to load what was built")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                               "--skip-build", "--out", args.out], cwd=ROOT)
        return proc.returncode
    from purify_fast import backend as _backend

    avail = _backend.available("cuda")
    for name in ("triton", "cuda"):
        if name not in avail:
            log(f"backend {name} unavailable: {_backend._usable(name, torch.device('cuda'))}")
    impls = [i for i in args.impls if i == "eager" or i in avail]
    if impls == ["eager"]:
        log("no kernel backend is usable (build the package first, or drop --skip-build): "
            "only eager PyTorch would be timed")
        return 3
    import shlex

    tests = "skipped (--skip-tests)" if args.skip_tests else run_tests(
        log, shlex.split(args.pytest_args), args.test_timeout)
    log(f"tests: {tests}")
    checks = self_check([i for i in impls if i != "eager"], log)

    timer = make_timer(args.timer, args.warmup_ms, args.rep_ms)
    copy_gbps = copy_bandwidth(timer)
    log(f"device-to-device copy: {copy_gbps:.1f} GB/s (1 GiB buffer, read + write)")
    op_names = {s.name for s in OPS if s.name.lower() in args.ops}
    rows = time_ops(args.models, op_names, impls, args.dtype, timer, copy_gbps, log)

    import triton  # noqa: F401 - version for the header only
    header = [
        "# purify_fast GPU suite",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {torch.cuda.get_device_name()} ({platform.node()})",
        (f"- torch {torch.__version__}, triton {sys.modules['triton'].__version__}, "
         f"CUDA {torch.version.cuda}, dtype {args.dtype}, timer {args.timer} (median)"),
        f"- device-to-device copy bandwidth (ceiling): {copy_gbps:.1f} GB/s",
        f"- tests: {tests}",
        *[f"- self-check {k}: {v}" for k, v in checks.items()],
        f"- kernel backends timed: {', '.join(i for i in impls if i != 'eager')}",
        "- GB/s counts the minimal bytes each op must move (same count for every impl); the",
        "  multi-scale LoRA forward is a matrix product, bound by arithmetic, not by bytes: its",
        "  GB/s and % of copy BW are not a ceiling, read its ms and speed-up.",
    ]
    text = markdown(rows, header)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        dict(copy_gbps=copy_gbps, tests=tests, self_check=checks, rows=rows, log=lines), indent=1,
        default=str))
    print("\n" + text)
    print(f"written: {args.out}")
    return 0 if all(v == "ok" for v in checks.values()) else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    shutil.which("nvcc") or print("gpu_suite: nvcc not on PATH; the cuda backend cannot be built",
                                  file=sys.stderr)
    sys.exit(main())
