"""Build script: only decides which compiled extensions to build.

* ``purify_fast._C``: C++ CPU kernels (OpenMP), built whenever torch's C++ extension tooling is
  present (it is on every machine with torch).
* ``purify_fast._C_cuda``: CUDA kernels, added only where torch was built with CUDA and ``nvcc`` is
  found. A missing CUDA never fails the install; ``purify-fast env`` says what was built and why not.

Set ``PURIFY_FAST_NO_EXT=1`` to skip every extension (pure PyTorch + Triton install).
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["purify_fast", "purify_fast.*"]) + ["purify_fast.kernels"]
PACKAGE_DIR = {"purify_fast": "purify_fast", "purify_fast.kernels": "kernels"}


def _ext_modules():
    if os.environ.get("PURIFY_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - torch absent: pure-Python install
        print(f"purify_fast: torch not importable at build time ({exc}); skipping extensions",
              file=sys.stderr)
        return [], {}

    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", *openmp]  # exact fp32 scores: no FMA
    cpu_sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc"))
        if f.endswith(".cpp") and not f.endswith("_cuda_binding.cpp")
    )
    # The shared headers (op signatures, registry, Philox) as dependencies, so that editing one
    # rebuilds the extensions.
    headers = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc"))
        if f.endswith((".h", ".cuh"))
    )
    exts = [CppExtension("purify_fast._C", cpu_sources, depends=headers,
                         extra_compile_args=cxx_flags, extra_link_args=openmp)]

    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
    if torch.version.cuda and nvcc and os.environ.get("PURIFY_FAST_NO_CUDA") != "1":
        cu_sources = sorted(
            os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc"))
            if f.endswith(".cu") or f.endswith("_cuda_binding.cpp")
        )
        arch = os.environ.get("PURIFY_FAST_CUDA_ARCH", "-arch=sm_90")
        exts.append(CUDAExtension(
            "purify_fast._C_cuda", cu_sources, depends=headers,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", arch, "--expt-relaxed-constexpr"]},
        ))
    else:
        print("purify_fast: no CUDA torch or no nvcc; building the CPU extension only",
              file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _ext_modules()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
