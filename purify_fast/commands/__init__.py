"""One module per ``purify-fast`` subcommand (see ``purify_fast.cli``), and what they share."""

from __future__ import annotations

import math
import os
from pathlib import Path

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


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes: refused at parse time, before any model loads."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_output_dir(out, *inputs, replace: bool = True) -> None:
    """Refuse, before any work, an ``--out`` that cannot or must not be written: one that names a
    file or an unrelated directory (``replace``: the output swaps in as a whole directory), one
    that is, holds or sits inside an input (inputs are never modified), or one under a directory
    this process cannot write to. Inputs that are not local paths (corpus and model names) are
    skipped."""
    from purify_fast.fileio import check_replaceable_dir

    out = Path(out).absolute()
    if replace:
        check_replaceable_dir(out)
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    resolved = out.resolve()
    for given in inputs:
        if not given or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(f"--out {out} overlaps the input {given}; inputs are never modified, "
                             f"so choose another output path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot create it under {parent} (not writable here)")
