"""Wall-clock timing shared by the benchmark modules' ``time_cpu`` tables (pytest-benchmark times
the ``test_bench_*`` cases itself)."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_wall_ms(run: Callable[[], object], reps: int) -> float:
    """Median wall time of ``run()`` in milliseconds over ``reps`` calls, after one warm-up call
    (first-call allocations and lazy initialisation are not what the tables compare)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
