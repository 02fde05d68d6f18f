"""One module per ``purify-fast`` subcommand (see ``purify_fast.cli``), and what they share."""

from __future__ import annotations

import math
import os

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def add_device_arg(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:i (default: cuda when torch sees a GPU, else cpu)")


def pick_device(requested: str | None) -> str:
    """``--device`` as given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_quota(path: str = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs the container's cgroup (v2) quota allows, or None when there is no quota."""
    try:
        with open(path) as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def limit_cpu_threads(path: str = CGROUP_CPU_MAX) -> int:
    """Cap torch's intra-op threads at the container's CPU quota and return the count in use.
    torch sizes its pool from the cores it can see; under a quota below that the extra threads
    only take turns on the allowed time and each training step gets slower. An explicit
    ``OMP_NUM_THREADS`` is the user's choice and is left alone."""
    import torch

    quota = cpu_quota(path)
    if quota is not None and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > quota:
        torch.set_num_threads(quota)
    return torch.get_num_threads()
