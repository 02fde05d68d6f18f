// The thin binding of purify_fast._C (C++/OpenMP CPU kernels): every op family registered itself
// through csrc/registry.h.
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "purify_fast C++/OpenMP CPU kernels";
  for (auto reg : purify_fast::registrars()) reg(m);
}
