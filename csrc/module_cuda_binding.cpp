// The thin binding of purify_fast._C_cuda (CUDA kernels): each family's *_cuda_binding.cpp wraps
// its extern "C" launchers from the .cu files and registers itself through csrc/registry.h.
#include "registry.h"

#include <string>

// csrc/device_check.cu
extern "C" int purify_fast_kernel_image_status(int device);
extern "C" const char* purify_fast_cuda_error_string(int code);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "purify_fast CUDA kernels";
  for (auto reg : purify_fast::registrars()) reg(m);
  m.def(
      "kernel_image_error",
      [](int device) -> std::string {
        const int code = purify_fast_kernel_image_status(device);
        return code == 0 ? std::string() : std::string(purify_fast_cuda_error_string(code));
      },
      "Empty if this build's kernels can run on CUDA device `device`, else the CUDA runtime's "
      "reason (the build targets another GPU architecture).",
      pybind11::arg("device"));
}
