"""Benchmarks of the multi-scale LoRA (MSLR) linear op, forward and forward+backward, against
(a) the official dense formulation ``x·Wᵀ + x·(c·R·diag(K)·L)ᵀ`` (the delta formed every call),
(b) unfused PEFT-style low-rank PyTorch ``base(x) + c·((x·Lᵀ)⊙K)·Rᵀ``, and
(c) the frozen base linear alone (the floor).

CPU (here)::

    pytest benchmarks/test_bench_multiscale_lora.py --benchmark-enable -q

at reduced LLaMA-like sizes (tokens 512, 1024→1024 and 1024→2752, i.e. 7B's 4096→11008 ratio),
fp32. GPU: :func:`run_gpu_benchmark` times LLaMA-7B shapes (tokens 4096–16384; 4096→4096 and
4096→11008; bf16) on every available kernel backend, and :func:`register_gpu_ops` adds the op to
``benchmarks/gpu_suite.py``'s registry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from purify_fast import backend as B
from purify_fast.ops import multiscale_lora
from purify_fast.reference.multiscale_lora import expand_scales

from _timing import median_wall_ms

SCALES = (1.0, 2.0, 3.0, 4.0)   # the LLM scales of MuScleLoRA, r_in = 1, alpha = 4
ALPHA = 4.0


def make_inputs(tokens: int, d_in: int, d_out: int, dtype=torch.float32, device="cpu",
                requires_grad: bool = False, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    q = len(SCALES)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=device) * std).to(dtype)
    x = mk(tokens, d_in)
    lo, ro = mk(q, d_in, std=d_in ** -0.5), mk(d_out, q, std=q ** -0.5)
    if requires_grad:
        for t in (x, lo, ro):
            t.requires_grad_(True)
    return {"x": x, "w": mk(d_out, d_in, std=d_in ** -0.5), "b": mk(d_out), "l": lo, "r": ro}


def fused(backend: str, mode: str = "radial"):
    return lambda t: multiscale_lora(t["x"], t["w"], t["b"], t["l"], t["r"], SCALES, ALPHA,
                                     mode=mode, backend=backend)


def official_dense(t):
    """The official code's formulation: the dense ``d_out×d_in`` delta formed every forward."""
    k = expand_scales(SCALES, 1, device=t["x"].device).to(t["l"].dtype)
    delta = (ALPHA / 1) * (t["r"] * k) @ t["l"]
    return F.linear(t["x"], t["w"], t["b"]) + F.linear(t["x"], delta)


def unfused_lowrank(t):
    """PEFT-style eager code: base output, low-rank branch, scale, add."""
    k = expand_scales(SCALES, 1, device=t["x"].device).to(t["l"].dtype)
    return F.linear(t["x"], t["w"], t["b"]) + F.linear(F.linear(t["x"], t["l"]) * k, t["r"]) * ALPHA


def base_only(t):
    return F.linear(t["x"], t["w"], t["b"])


def implementations(device="cpu") -> dict:
    impls = {"base": base_only, "unfused": unfused_lowrank, "official_dense": official_dense}
    for name in B.available(device):
        if name in ("cpp", "cuda") or (name == "triton" and torch.device(device).type == "cuda"):
            impls[f"fused_{name}"] = fused(name)
    return impls


def _fwd_bwd(fn, t):
    def run():
        y = fn(t)
        y.backward(t["gy"])
        for k in ("x", "l", "r"):
            t[k].grad = None
    return run


# --------------------------------------------------------------------------- CPU (pytest-benchmark)

CPU_SHAPES = [(512, 1024, 1024), (512, 1024, 2752)]
CPU_IMPLS = list(implementations("cpu"))


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bench_forward_cpu(benchmark, impl, shape):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t = make_inputs(*shape)
    fn = implementations("cpu")[impl]
    ref = base_only(t) if impl == "base" else unfused_lowrank(t)
    with torch.no_grad():
        out = benchmark(lambda: fn(t))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    benchmark.extra_info["gflop"] = 2 * shape[0] * shape[1] * shape[2] / 1e9


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "base"])
def test_bench_forward_backward_cpu(benchmark, impl, shape):
    t = make_inputs(*shape, requires_grad=True)
    t["gy"] = torch.randn(shape[0], shape[2])
    benchmark(_fwd_bwd(implementations("cpu")[impl], t))


# --------------------------------------------------------------------------- GPU

GPU_TOKENS = (4096, 8192, 16384)
GPU_SHAPES = ((4096, 4096), (4096, 11008))


def _time_cuda(fn, reps: int = 50) -> float:
    """Median milliseconds (triton.testing.do_bench when available, else CUDA events)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - older triton or no triton: plain event loop
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def run_gpu_benchmark(tokens=GPU_TOKENS, shapes=GPU_SHAPES, dtype=torch.bfloat16,
                      check: bool = True) -> list[dict]:
    """Rows ``{tokens, d_in, d_out, impl, pass, ms, tflops, vs_base, vs_unfused}`` for every
    implementation, forward and forward+backward, at LLaMA-7B shapes on the current CUDA device.
    With ``check``, each fused backend is first compared with the unfused eager result."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_gpu_benchmark needs a CUDA device")
    rows = []
    for m in tokens:
        for d_in, d_out in shapes:
            t = make_inputs(m, d_in, d_out, dtype, "cuda")
            impls = implementations("cuda")
            if check:
                with torch.no_grad():
                    ref = unfused_lowrank(t).float()
                    for name, fn in impls.items():
                        if name.startswith("fused"):
                            err = (fn(t).float() - ref).abs().max().item()
                            bound = 3e-2 * ref.abs().max().item()
                            if not err <= bound:
                                raise AssertionError(f"{name} differs from eager by {err} > {bound}")
            flop = 2 * m * d_in * d_out
            for pas in ("fwd", "fwd+bwd"):
                if pas == "fwd+bwd":
                    t = make_inputs(m, d_in, d_out, dtype, "cuda", requires_grad=True)
                    t["gy"] = torch.randn(m, d_out, device="cuda", dtype=dtype)
                times = {}
                for name, fn in impls.items():
                    if pas == "fwd+bwd" and name == "base":
                        continue
                    if pas == "fwd":
                        def call(fn=fn, t=t):
                            with torch.no_grad():
                                fn(t)
                        times[name] = _time_cuda(call)
                    else:
                        times[name] = _time_cuda(_fwd_bwd(fn, t))
                for name, ms in times.items():
                    rows.append(dict(tokens=m, d_in=d_in, d_out=d_out, impl=name, **{"pass": pas},
                                     ms=ms, tflops=(flop * (1 if pas == "fwd" else 3)) / ms / 1e9,
                                     vs_base=ms / times["base"] if "base" in times else None,
                                     vs_unfused=times["unfused"] / ms))
            del t
            torch.cuda.empty_cache()
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    out = ["| tokens | d_in→d_out | pass | impl | ms | TFLOP/s | × base | speed-up vs unfused |",
           "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        vb = "" if r["vs_base"] is None else f"{r['vs_base']:.3f}"
        out.append(f"| {r['tokens']} | {r['d_in']}→{r['d_out']} | {r['pass']} | {r['impl']} | "
                   f"{r['ms']:.3f} | {r['tflops']:.1f} | {vb} | {r['vs_unfused']:.2f} |")
    return "\n".join(out)


def register_gpu_ops(register_op, OpSpec, tokens: int = 8192) -> None:
    """Add the MSLR forward to ``benchmarks/gpu_suite.py``: ``eager`` is the unfused PEFT-style
    code, ``triton`` / ``cuda`` the fused op; shapes from the suite's model presets
    (hidden → intermediate)."""

    def inputs(model, dtype, device):
        return make_inputs(tokens, model["hidden"], model["intermediate"], dtype, device)

    def fused_impl(name):
        def build(t):
            if name not in B.available(t["x"].device):
                return None
            fn = fused(name)
            return lambda: fn(t)
        return build

    register_op(OpSpec(
        "multiscale_lora_fwd", inputs,
        {"eager": lambda t: (lambda: unfused_lowrank(t)), "triton": fused_impl("triton"),
         "cuda": fused_impl("cuda")},
        # Minimal traffic: read x and W once, write y once.
        lambda t: (t["x"].numel() + t["w"].numel() + t["x"].shape[0] * t["w"].shape[0])
        * t["x"].element_size(),
        shape=lambda t: f"{t['x'].shape[0]}x{t['x'].shape[1]}->{t['w'].shape[0]}"))


def time_cpu(reps: int = 5) -> list[dict]:
    """Median wall ms per implementation at CPU_SHAPES (used for benchmarks/results_muscle_lora.md)."""
    rows = []
    for shape in CPU_SHAPES:
        for pas in ("fwd", "fwd+bwd"):
            t = make_inputs(*shape, requires_grad=pas != "fwd")
            t["gy"] = torch.randn(shape[0], shape[2])
            for name, fn in implementations("cpu").items():
                if pas != "fwd" and name == "base":
                    continue
                run = _fwd_bwd(fn, t) if pas != "fwd" else (lambda fn=fn, t=t: fn(t))
                ctx = torch.no_grad() if pas == "fwd" else torch.enable_grad()
                with ctx:
                    ms = median_wall_ms(run, reps)
                rows.append(dict(shape="x".join(map(str, shape)), impl=name, **{"pass": pas},
                                 ms=ms))
    return rows


if __name__ == "__main__":  # pragma: no cover - manual runs
    if torch.cuda.is_available():
        print(rows_to_markdown(run_gpu_benchmark()))
    else:
        for r in time_cpu():
            print(r)
