"""Which kernel backends exist on this machine, and which one an op call should use.

Backends, fastest first for each device:

* ``cuda``   compiled CUDA kernels (``purify_fast._C_cuda``), CUDA tensors only;
* ``triton`` Triton kernels (``purify_fast.kernels``), CUDA tensors, or CPU tensors under the
  Triton interpreter (``TRITON_INTERPRET=1``, which CI uses to run them without a GPU);
* ``cpp``    compiled C++/OpenMP kernels (``purify_fast._C``), CPU tensors only;
* ``torch``  the readable PyTorch reference (``purify_fast.reference``), everywhere.

``backend=None`` or ``"auto"`` first reads the ``PURIFY_FAST_BACKEND`` variable; unset (or
``auto``), it picks quietly: CUDA tensors get ``cuda``, else ``triton``, else ``torch``; CPU tensors
get ``cpp``, else ``torch``. A backend the variable names runs every call it can take and leaves
the rest (fp64, a shape its kernels refuse) to ``torch``, as ``auto`` does; a backend named in the
call runs it or raises. A named backend (argument or variable) that cannot run here raises
:class:`BackendUnavailable` carrying the import error and a one-line fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
ENV_VAR = "PURIFY_FAST_BACKEND"

# dtypes every compiled kernel handles; anything else (fp64 in gradchecks, say) runs on torch under
# "auto" or the variable, and is refused by a backend named in the call.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # version or location when available, the reason when not
    fix: str = ""


def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=None)
def _cpp() -> tuple[ModuleType | None, str]:
    return _import("purify_fast._C")


@lru_cache(maxsize=None)
def _cuda() -> tuple[ModuleType | None, str]:
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    mod, err = _import("purify_fast._C_cuda")
    if mod is not None:
        err = _cuda_arch_mismatch(mod)
    return (None, err) if err else (mod, "")


def _cuda_arch_mismatch(mod: ModuleType) -> str:
    """Why the extension's kernels cannot run on the current GPU ("" if they can). The build
    targets one architecture (PURIFY_FAST_CUDA_ARCH, default sm_90); without this check an older
    GPU would pass every test of availability and then fail inside the first op."""
    check = getattr(mod, "kernel_image_error", None)
    if check is None:  # an extension built before the check existed: nothing to ask
        return ""
    device = torch.cuda.current_device()
    why = check(device)
    if not why:
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    return (f"purify_fast._C_cuda was built for another GPU architecture than "
            f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}): {why}; rebuild with "
            f"PURIFY_FAST_CUDA_ARCH=-arch=sm_{major}{minor} pip install --no-build-isolation -e .")


@lru_cache(maxsize=None)
def _triton() -> tuple[ModuleType | None, str]:
    mod, err = _import("triton")
    if mod is None:
        return None, err
    return _import("purify_fast.kernels")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_kernels_interpreted: bool | None = None


def _triton_kernels_interpreted() -> bool | None:
    """Whether purify_fast's Triton kernels were built for the interpreter (None: cannot tell).
    triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when the kernel module is
    imported: setting it later leaves compiled kernels that need a GPU driver."""
    global _kernels_interpreted
    if _kernels_interpreted is None:
        mod = sys.modules.get("purify_fast.kernels.weight_space")
        if mod is None:
            return None
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except Exception:  # noqa: BLE001 - another triton layout: fall back to the variable
            return None
        for value in vars(mod).values():
            if isinstance(value, InterpretedFunction):
                _kernels_interpreted = True
                break
            if isinstance(value, JITFunction):
                _kernels_interpreted = False
                break
    return _kernels_interpreted


_LATE_INTERPRET = ("TRITON_INTERPRET=1 was set after purify_fast's Triton kernels were imported "
                   "(Triton reads it when a kernel is defined)")
_LATE_INTERPRET_FIX = ("set TRITON_INTERPRET=1 at start-up, before importing purify_fast "
                       "(e.g. TRITON_INTERPRET=1 python ...)")


_FIXES = {
    "cpp": "reinstall with a C++ compiler present: pip install --no-build-isolation -e .",
    "cuda": "on a machine with a CUDA torch and nvcc: pip install --no-build-isolation -e . "
            "(for a GPU other than Hopper, set PURIFY_FAST_CUDA_ARCH=-arch=sm_XY first)",
    "triton": "pip install triton (and use CUDA tensors, or for CPU tensors set TRITON_INTERPRET=1 "
              "at start-up, before importing purify_fast)",
}


def module(name: str) -> ModuleType:
    """The kernel module behind backend ``name`` (raises if it cannot be imported)."""
    loaders = {"cpp": _cpp, "cuda": _cuda, "triton": _triton}
    if name not in loaders:
        what = ("has no kernel module: it runs purify_fast.reference directly"
                if name == "torch" else "is not a kernel backend")
        raise ValueError(f"backend {name!r} {what}; module() takes one of "
                         f"{', '.join(map(repr, loaders))}")
    loaded, err = loaders[name]()
    if loaded is None:
        raise BackendUnavailable(f"backend {name!r} is unavailable ({err}); fix: {_FIXES[name]}")
    return loaded


def _usable(name: str, device: torch.device) -> str:
    """Empty string if backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "torch":
        return ""
    loaded, err = {"cpp": _cpp, "cuda": _cuda, "triton": _triton}[name]()
    if loaded is None:
        return err
    if name == "cpp" and device.type != "cpu":
        return f"the C++ kernels take CPU tensors, got {device.type}"
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, got {device.type}"
    if name == "triton" and device.type != "cuda":
        if not (device.type == "cpu" and triton_interpreting()):
            return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device.type}"
        if _triton_kernels_interpreted() is False:
            return _LATE_INTERPRET
    return ""


def check_name(backend: str | None, name: str = "backend") -> str | None:
    """``backend`` as an option value (None, "auto" or one of :data:`BACKENDS`), checked when a
    config is built rather than at the first op call, minutes later; whether it can run on the
    device is :func:`resolve`'s question (which checks names here too)."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{name} must be a str or None, got {type(backend).__name__} {backend!r}")
    if backend.lower() != "auto" and backend.lower() not in BACKENDS:
        raise ValueError(f"{name} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {backend.lower()!r}")
    return backend


def fastest(device: torch.device, dtype: torch.dtype | None = None, *,
            skip: tuple[str, ...] = ()) -> str:
    """What "auto" picks for ``device`` and ``dtype``, whatever ``PURIFY_FAST_BACKEND`` says."""
    if dtype is None or dtype in KERNEL_DTYPES:
        for name in ("cuda", "triton") if device.type == "cuda" else ("cpp",):
            if name not in skip and not _usable(name, device):
                return name
    return "torch"


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None, *,
            skip: tuple[str, ...] = ()) -> str:
    """The backend name an op call runs on.

    ``backend`` None or "auto" reads ``PURIFY_FAST_BACKEND``; unset or "auto", the fastest usable
    backend for ``device`` is picked. A backend named (in the call or the variable) that cannot
    run raises :class:`BackendUnavailable`. A dtype the kernels do not take (fp64) runs on torch
    under "auto" or the variable, and raises TypeError for a backend named in the call.
    ``skip``: backends whose kernels refuse this call's shape (the MSLR CUDA kernels take rank
    ``n·r_in <= 64``, say); "auto" passes over them and the variable's backend leaves the call to
    torch, while a backend named in the call still gets it and raises its own error.
    """
    source = "backend"
    if backend is None or (isinstance(backend, str) and backend.lower() == "auto"):
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"the {ENV_VAR} variable"
    backend = check_name(backend, source).lower()
    from_env = source != "backend"
    kernel_dtype = dtype is None or dtype in KERNEL_DTYPES
    if backend == "auto":
        return fastest(device, dtype, skip=skip)
    if backend != "torch":
        reason = _usable(backend, device)
        if reason:
            fix = _LATE_INTERPRET_FIX if reason == _LATE_INTERPRET else _FIXES[backend]
            raise BackendUnavailable(f"backend {backend!r} cannot run here: {reason}; fix: {fix}")
        if from_env and (not kernel_dtype or backend in skip):
            return "torch"  # the variable is a preference: its kernels' refusals go to torch
        if not kernel_dtype:
            raise TypeError(f"backend {backend!r} supports float32, float16 and bfloat16; "
                            f"got {dtype} (use backend='torch')")
    return backend


def available(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` right now (none on a CUDA device torch cannot see)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (use 'cpu' or 'cuda[:i]')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [name for name in BACKENDS if not _usable(name, device)]


def status() -> list[BackendStatus]:
    """Availability of every backend with versions, reasons and fixes (``purify-fast env``)."""
    rows = [BackendStatus("torch", True, f"torch {torch.__version__}")]
    for name in ("triton", "cpp", "cuda"):
        loaded, err = {"cpp": _cpp, "cuda": _cuda, "triton": _triton}[name]()
        if loaded is None:
            rows.append(BackendStatus(name, False, err, _FIXES[name]))
            continue
        if name == "triton":
            import triton

            late = (not torch.cuda.is_available() and triton_interpreting()
                    and _triton_kernels_interpreted() is False)
            where = "CUDA" if torch.cuda.is_available() else (
                f"not on CPU: {_LATE_INTERPRET}" if late else
                "CPU interpreter" if triton_interpreting() else
                "no CUDA device: set TRITON_INTERPRET=1 at start-up to run on CPU")
            rows.append(BackendStatus(name, True, f"triton {triton.__version__} ({where})",
                                      _LATE_INTERPRET_FIX if late else ""))
        else:
            rows.append(BackendStatus(name, True, getattr(loaded, "__file__", name)))
    return rows


def describe() -> str:
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, "
             f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}"]
    for row in status():
        mark = "yes" if row.available else "no "
        lines.append(f"  {row.name:<7} {mark}  {row.detail}" + (f"\n          fix: {row.fix}" if row.fix else ""))
    return "\n".join(lines)
