"""Benchmarks of MIMIC's attention-map loss ``Σ_l w_l · MSE(A(F_S,l), A(F_T,l))`` (one call per
training step, over every chosen layer), forward and forward+backward, against eager PyTorch: the
readable reference :func:`purify_fast.reference.attention_maps.attention_map_loss` with autograd.

CPU (here)::

    pytest benchmarks/test_bench_attention_maps.py --benchmark-enable -q
    python benchmarks/test_bench_attention_maps.py        # median-of-15 table, as in the results

Shapes (batch × positions × channels × layers, a quarter of each row padded):
MIMIC on MiniLM as ``benchmarks/run_mimic.py`` runs it (32 × 64 × 384, 2 layers), BERT-base at
128 tokens (32 × 128 × 768, 4 layers) and at 512 (16 × 512 × 768, 4 layers). The student's maps
require gradients, the teacher's do not (frozen), as in :class:`purify_fast.defenses.MIMIC`.
GPU: :func:`register_gpu_ops` adds the forward+backward to ``benchmarks/gpu_suite.py``.
"""

from __future__ import annotations

import pytest
import torch

from purify_fast import backend as B
from purify_fast.ops import attention_map_loss
from purify_fast.reference import attention_maps as ref

from _timing import median_wall_ms

# (batch, positions, channels, layers)
CPU_SHAPES = [(32, 64, 384, 2), (32, 128, 768, 4), (16, 512, 768, 4)]


def make_inputs(batch: int, positions: int, channels: int, layers: int, dtype=torch.float32,
                device="cpu", seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda: torch.randn(batch, positions, channels, generator=g, device=device).to(dtype)
    mask = torch.ones(batch, positions, device=device)
    mask[:, positions - positions // 4:] = 0  # padded tail, as in a batch of shorter texts
    return {"fs": [mk().requires_grad_(True) for _ in range(layers)],
            "ft": [mk() for _ in range(layers)],
            "w": [1000.0 + 500.0 * i for i in range(layers)],  # a + b·MI-like layer weights
            "mask": mask}


def eager(t):
    return ref.attention_map_loss(t["fs"], t["ft"], t["w"], t["mask"])


def kernel(backend: str):
    return lambda t: attention_map_loss(t["fs"], t["ft"], t["w"], t["mask"], backend=backend)


def implementations(device="cpu") -> dict:
    impls = {"eager": eager}
    for name in B.available(device):
        if name in ("cpp", "cuda") or (name == "triton" and torch.device(device).type == "cuda"):
            impls[name] = kernel(name)
    return impls


def _fwd_bwd(fn, t):
    def run():
        fn(t).backward()
        for f in t["fs"]:
            f.grad = None
    return run


def _shape_id(shape) -> str:
    return "{}x{}x{}-L{}".format(*shape)


# --------------------------------------------------------------------------- CPU (pytest-benchmark)

CPU_IMPLS = list(implementations("cpu"))


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bench_forward_cpu(benchmark, impl, shape):
    t = make_inputs(*shape)
    fn = implementations("cpu")[impl]  # looked up once: not inside the timed call
    with torch.no_grad():
        out = benchmark(lambda: fn(t))
        torch.testing.assert_close(out, eager(t), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bench_forward_backward_cpu(benchmark, impl, shape):
    t = make_inputs(*shape)
    fn = implementations("cpu")[impl]
    # the timed implementation's gradients against eager's, before timing
    fn(t).backward()
    got = [f.grad.clone() for f in t["fs"]]
    for f in t["fs"]:
        f.grad = None
    eager(t).backward()
    for a, f in zip(got, t["fs"]):
        torch.testing.assert_close(a, f.grad, rtol=1e-4, atol=1e-9)
        f.grad = None
    benchmark(_fwd_bwd(fn, t))


def time_cpu(reps: int = 15, shapes=CPU_SHAPES) -> list[dict]:
    """Median wall ms per implementation and pass at ``shapes`` (the results table's rows)."""
    rows = []
    for shape in shapes:
        t = make_inputs(*shape)
        for pas in ("fwd", "fwd+bwd"):
            for name, fn in implementations("cpu").items():
                if pas == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            fn(t)
                else:
                    run = _fwd_bwd(fn, t)
                rows.append(dict(shape=_shape_id(shape), impl=name, **{"pass": pas},
                                 ms=median_wall_ms(run, reps)))
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    eager_ms = {(r["shape"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager"}
    out = ["| batch×positions×channels-layers | pass | impl | median ms | speed-up vs eager |",
           "|---|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['pass']} | {r['impl']} | {r['ms']:.2f} | "
                   f"{eager_ms[(r['shape'], r['pass'])] / r['ms']:.2f}x |")
    return "\n".join(out)


# --------------------------------------------------------------------------- GPU suite

def register_gpu_ops(register_op, OpSpec, batch: int = 32, positions: int = 512,
                     layers: int = 4) -> None:
    """Add the loss's forward+backward to ``benchmarks/gpu_suite.py``: maps of
    ``[batch, positions, hidden]`` for ``layers`` layers, hidden from the suite's model presets;
    ``eager`` is the reference with autograd, ``triton`` / ``cuda`` the kernels."""

    def inputs(model, dtype, device):
        return make_inputs(batch, positions, model["hidden"], layers, dtype, device)

    def impl(name):
        def build(t):
            if name != "eager" and name not in B.available(t["fs"][0].device):
                return None
            return _fwd_bwd(eager if name == "eager" else kernel(name), t)
        return build

    register_op(OpSpec(
        "attention_map_loss_fwd_bwd", inputs, {n: impl(n) for n in ("eager", "triton", "cuda")},
        # Minimal traffic: read every student and teacher map once, read the student's again and
        # write its gradient in the backward.
        lambda t: sum(3 * fs.numel() * fs.element_size() + ft.numel() * ft.element_size()
                      for fs, ft in zip(t["fs"], t["ft"])),
        shape=lambda t: f"{len(t['fs'])}x{'x'.join(map(str, t['fs'][0].shape))}"))


if __name__ == "__main__":  # pragma: no cover - manual runs
    print(rows_to_markdown(time_cpu()))
