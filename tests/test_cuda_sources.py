"""Compile checks for the CUDA sources, and the shared Philox header against known answers.

The CUDA kernels cannot run on a CPU-only CI machine, but they can be compiled: each ``csrc/*.cu``
must build with a plain ``nvcc -c -arch=sm_90`` (no torch headers; skipped where nvcc is absent).
``csrc/philox.h`` is what both the C++ and the CUDA kernels draw their masks from, so it is built
once as a small host program and checked against the Random123 known-answer vector and against
the PyTorch reference generator. Last, source-level rules for what only a GPU would show: fp32
``tl.dot`` in IEEE precision, and every launch (Triton or CUDA binding) on its tensors' device.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from purify_fast.reference import weight_space as ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_file_compiles_with_plain_nvcc(name, tmp_path):
    proc = subprocess.run(
        [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O1", str(CSRC / name), "-o",
         str(tmp_path / (name + ".o"))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {name}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / (name + ".o")).stat().st_size > 0


_PROBE_MAIN = r"""
#include <cstdio>
extern "C" int purify_fast_kernel_image_status(int device);
extern "C" const char* purify_fast_cuda_error_string(int code);
int main() {
  const int code = purify_fast_kernel_image_status(0);
  std::printf("%d|%s\n", code, code ? purify_fast_cuda_error_string(code) : "");
  return 0;
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_device_check_answers_without_failing(tmp_path):
    """csrc/device_check.cu linked into a host program: on a machine whose GPU can run sm_90 code
    it says 0; anywhere else (no GPU, no driver, an older GPU) it returns the CUDA runtime's
    reason instead of crashing, which is what the backend shows the user."""
    main = tmp_path / "main.cpp"
    main.write_text(_PROBE_MAIN)
    exe = tmp_path / "probe"
    build = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-O1", str(CSRC / "device_check.cu"),
                            str(main), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    code, _, reason = run.stdout.strip().partition("|")
    hopper_or_newer = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (9, 0)
    if hopper_or_newer:
        assert int(code) == 0 and reason == ""
    else:
        assert int(code) != 0 and reason


_KAT_PROGRAM = r"""
#include "philox.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
// full K0 K1 C0 C1 C2 C3  -> the four output words of Philox4x32-10 (hex)
// first K0 K1 I...        -> first_word(I, K0, K1) for each 64-bit index I (decimal)
int main(int argc, char** argv) {
  using namespace purify_fast::philox;
  if (argc >= 8 && std::strcmp(argv[1], "full") == 0) {
    uint32_t k0 = std::strtoul(argv[2], nullptr, 0), k1 = std::strtoul(argv[3], nullptr, 0);
    uint32_t c[4];
    for (int i = 0; i < 4; ++i) c[i] = std::strtoul(argv[4 + i], nullptr, 0);
    philox4x32_10(c, k0, k1);
    std::printf("%08x %08x %08x %08x\n", c[0], c[1], c[2], c[3]);
    return 0;
  }
  if (argc >= 4 && std::strcmp(argv[1], "first") == 0) {
    uint32_t k0 = std::strtoul(argv[2], nullptr, 0), k1 = std::strtoul(argv[3], nullptr, 0);
    for (int i = 4; i < argc; ++i)
      std::printf("%u\n", first_word(std::strtoull(argv[i], nullptr, 0), k0, k1));
    return 0;
  }
  return 2;
}
"""


@pytest.fixture(scope="module")
def philox_exe(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler found")
    d = tmp_path_factory.mktemp("philox")
    src = d / "kat.cpp"
    src.write_text(_KAT_PROGRAM)
    exe = d / "kat"
    proc = subprocess.run([CXX, "-std=c++17", "-O2", f"-I{CSRC}", str(src), "-o", str(exe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"philox.h does not compile as host code:\n{proc.stderr[-4000:]}"
    return exe


def _run(exe, *args) -> list[str]:
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:-1]


def test_philox_known_answer_zero_counter_zero_key(philox_exe):
    # Random123 kat_vectors: philox4x32 10 rounds, ctr = 0, key = 0.
    words = _run(philox_exe, "full", 0, 0, 0, 0, 0, 0)[0].split()
    assert words[0] == "6627e8d5"
    assert words == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]


def test_philox_known_answer_all_ones(philox_exe):
    # Random123 kat_vectors: ctr = 0xffffffff x4, key = 0xffffffff x2.
    m = 0xFFFFFFFF
    words = _run(philox_exe, "full", m, m, m, m, m, m)[0].split()
    assert words == ["408f276d", "41c83b0e", "a20bc7c6", "6d5451fd"]


@pytest.mark.parametrize("k0,k1", [(0, 0), (12345, ref.key_hash("encoder.layer.0.weight")),
                                   (0xFFFFFFFF, 0xFFFFFFFF)])
def test_first_word_matches_torch_reference_and_full_generator(philox_exe, k0, k1):
    g = torch.Generator().manual_seed(k0 ^ k1)
    idx = [0, 1, 2, 3, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, (1 << 40) + 12345, (1 << 63) - 1]
    idx += torch.randint(0, 1 << 62, (23,), generator=g).tolist()
    got = [int(x) for x in _run(philox_exe, "first", k0, k1, *idx)]
    want = ref.philox_uint32(torch.tensor(idx, dtype=torch.int64), k0, k1).tolist()
    assert got == want
    # The shortened last round of first_word must equal word 0 of the full generator.
    for i in idx[:6]:
        full = _run(philox_exe, "full", k0, k1, i & 0xFFFFFFFF, i >> 32, 0, 0)[0].split()
        assert int(full[0], 16) == got[idx.index(i)]


# --------------------------------------------------------------------------- source-level rules
# Properties no CPU run can observe: what the GPU compilers are asked for and on which device.

KERNELS = ROOT / "kernels"
KERNEL_FILES = sorted(p.name for p in KERNELS.glob("*.py") if p.name != "__init__.py")
BINDINGS = sorted(p.name for p in CSRC.glob("*_cuda_binding.cpp"))


def _tree_with_parents(path: Path) -> ast.AST:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    return tree


def _ancestors(node):
    while hasattr(node, "parent"):
        yield node, node.parent
        node = node.parent


def _is_tl_dot(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "dot" and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "tl")


def _ieee(call: ast.Call) -> bool:
    return any(k.arg == "input_precision" and isinstance(k.value, ast.Constant)
               and k.value.value == "ieee" for k in call.keywords)


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_every_tl_dot_states_ieee_precision_for_fp32(name):
    """A ``tl.dot`` without ``input_precision`` runs fp32 inputs in TF32 on NVIDIA GPUs (10-bit
    mantissa), which the CPU interpreter never shows. Each one must ask for "ieee", or be the
    half-precision branch of an ``if FLAG:`` whose fp32 branch does."""
    tree = _tree_with_parents(KERNELS / name)
    for call in filter(_is_tl_dot, ast.walk(tree)):
        if _ieee(call):
            continue
        guarded = False
        for child, parent in _ancestors(call):
            if isinstance(parent, ast.If) and any(child is s for s in parent.orelse):
                guarded = any(_is_tl_dot(n) and _ieee(n)
                              for s in parent.body for n in ast.walk(s))
                break
        assert guarded, f"{name}:{call.lineno}: tl.dot without input_precision for fp32 inputs"


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_every_triton_launch_is_under_the_device_guard(name):
    """Triton launches on the current CUDA device, so a tensor on another GPU needs the
    ``with _device_guard(t):`` that switches to it."""
    tree = _tree_with_parents(KERNELS / name)
    launches = [n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                and isinstance(n.func.value, ast.Name) and n.func.value.id.endswith(
                    ("_kernel", "_tuned"))]
    assert launches
    for call in launches:
        assert any(isinstance(p, ast.With) and any(
            isinstance(i.context_expr, ast.Call) and isinstance(i.context_expr.func, ast.Name)
            and i.context_expr.func.id == "_device_guard" for i in p.items)
            for _, p in _ancestors(call)), f"{name}:{call.lineno}: launch outside _device_guard"


@pytest.mark.parametrize("name", BINDINGS)
def test_every_cuda_binding_sets_the_device_before_taking_the_stream(name):
    """The current stream belongs to the current device: each binding function sets a CUDAGuard
    to its tensors' device before it asks for the stream and launches."""
    # Top-level functions end with a "}" in column 0; the one-line stream() helper is no user.
    for body in re.split(r"^}", (CSRC / name).read_text(), flags=re.M):
        uses = [m.start() for m in re.finditer(r"getCurrentCUDAStream\(\)|\bstream\(\)", body)
                if not re.match(r"cudaStream_t stream\(\)", body[body.rfind("\n", 0, m.start())
                                                                 + 1:].lstrip())]
        if uses:
            guard = body.find("CUDAGuard")
            assert 0 <= guard < uses[0], (
                f"{name}: a function takes the CUDA stream without a CUDAGuard first:\n"
                f"{body.strip()[:300]}")
