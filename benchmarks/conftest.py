"""Options and shared helpers of the CPU benchmark suite (pytest-benchmark).

Not collected by the default test run (``testpaths = ["tests"]``); run it explicitly::

    pytest benchmarks/test_bench_weight_space.py --benchmark-enable -q \
        [--bench-size 1M,16M] [--bench-dtype float32,bfloat16] [--bench-md OUT.md]

Sizes also come from ``PURIFY_FAST_BENCH_SIZES`` (same syntax). The torch reference of the Philox
mask is ~0.6 µs per element, so it is only timed up to ``--bench-ref-max`` elements (default 4M).

How peak extra memory is measured: see ``peak_extra_bytes`` in test_bench_weight_space.py.
"""

from __future__ import annotations

import os

import pytest
import torch


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    try:
        value = int(float(digits) * mult)
    except ValueError:
        raise pytest.UsageError(f"--bench-size: cannot parse {text!r} (use e.g. 1M,16M,100M)")
    if value <= 0:
        raise pytest.UsageError(f"--bench-size: sizes must be positive, got {text!r}")
    return value


def pytest_addoption(parser):
    group = parser.getgroup("purify_fast benchmarks")
    group.addoption("--bench-size", default=os.environ.get("PURIFY_FAST_BENCH_SIZES", "1M,16M"),
                    help="comma list of element counts (K/M/G suffixes), default 1M,16M")
    group.addoption("--bench-dtype", default="float32,bfloat16",
                    help="comma list of dtypes among float32, float16, bfloat16")
    group.addoption("--bench-ref-max", default="4M",
                    help="largest size at which the slow torch reference is timed (default 4M)")
    group.addoption("--bench-md", default=None, help="also write the summary table to this file")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (the C++ kernels follow it); a single "
                         "thread is far less disturbed by other jobs on a shared machine")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    # Only modules that opt in get their `size` / `dtype` arguments from these options, so other
    # benchmark files in this folder keep their own parametrisation.
    if not getattr(metafunc.module, "USES_BENCH_OPTIONS", False):
        return
    cfg = metafunc.config
    if "size" in metafunc.fixturenames:
        sizes = [_parse_size(s) for s in cfg.getoption("--bench-size").split(",") if s.strip()]
        metafunc.parametrize("size", sizes, ids=[f"n{s}" for s in sizes])
    if "dtype" in metafunc.fixturenames:
        names = [s.strip() for s in cfg.getoption("--bench-dtype").split(",") if s.strip()]
        dtypes = []
        for name in names:
            dt = getattr(torch, name, None)
            if dt not in (torch.float32, torch.float16, torch.bfloat16):
                raise pytest.UsageError(f"--bench-dtype: {name!r} is not float32, float16 or bfloat16")
            dtypes.append(dt)
        metafunc.parametrize("dtype", dtypes, ids=names)


class Records:
    """Rows of the summary table, filled by the benchmarks, printed (and written) at the end."""

    def __init__(self):
        self.rows: list[dict] = []
        self.eager: dict[tuple, float] = {}

    def add(self, op, dtype, size, impl, seconds, nbytes, extra):
        key = (op, str(dtype).replace("torch.", ""), size)
        if impl == "eager":
            self.eager[key] = seconds
        self.rows.append(dict(op=op, dtype=key[1], size=size, impl=impl, seconds=seconds,
                              gbps=nbytes / seconds / 1e9, extra=extra))
        eager = self.eager.get(key)
        return None if eager is None else eager / seconds

    def table(self) -> str:
        lines = ["| op | dtype | N | impl | median ms | GB/s | speed-up vs eager | peak extra MiB |",
                 "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in self.rows:
            key = (r["op"], r["dtype"], r["size"])
            eager = self.eager.get(key)
            ratio = f"{eager / r['seconds']:.2f}x" if eager else "n/a"
            extra = "n/a" if r["extra"] is None else f"{r['extra'] / 2**20:.1f}"
            lines.append(f"| {r['op']} | {r['dtype']} | {r['size']:,} | {r['impl']} | "
                         f"{r['seconds'] * 1e3:.2f} | {r['gbps']:.2f} | {ratio} | {extra} |")
        return "\n".join(lines)


@pytest.fixture(scope="session")
def records(request):
    rec = Records()
    request.config._purify_fast_bench_records = rec
    return rec


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = getattr(config, "_purify_fast_bench_records", None)
    if rec is None or not rec.rows:
        return
    text = rec.table()
    terminalreporter.write_sep("=", "purify_fast weight-space benchmarks (CPU, "
                               f"{torch.get_num_threads()} torch threads)")
    terminalreporter.write_line(text)
    path = config.getoption("--bench-md")
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
        terminalreporter.write_line(f"table written to {path}")


@pytest.fixture(scope="session")
def ref_max(request) -> int:
    return _parse_size(request.config.getoption("--bench-ref-max"))
