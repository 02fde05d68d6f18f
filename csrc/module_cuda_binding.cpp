// The thin binding of purify_fast._C_cuda (CUDA kernels): each family's *_cuda_binding.cpp wraps
// its extern "C" launchers from the .cu files and registers itself through csrc/registry.h.
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "purify_fast CUDA kernels";
  for (auto reg : purify_fast::registrars()) reg(m);
}
