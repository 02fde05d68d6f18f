// Can the kernels of purify_fast._C_cuda run on a given GPU? The extension is compiled for one
// architecture (PURIFY_FAST_CUDA_ARCH, default -arch=sm_90: sm_90 code plus compute_90 PTX, so
// Hopper and newer); on an older GPU every launch would fail inside an op with "no kernel image
// is available". purify_fast.backend asks once, when it loads the extension, and treats the cuda
// backend as unavailable (auto then picks Triton) with the rebuild command as the fix. Every .cu
// file of the extension is built with the same flags, so the kernel here answers for all of them.
#include <cuda_runtime.h>

namespace {

__global__ void probe_kernel(int* flag) {
  if (flag != nullptr) *flag = 0;
}

}  // namespace

// cudaSuccess (0) if the probe kernel has an image or PTX this device can run, else the error.
extern "C" int purify_fast_kernel_image_status(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, probe_kernel);
  }
  cudaSetDevice(previous);
  cudaGetLastError();  // leave no error behind for the next launch to report as its own
  return static_cast<int>(err);
}

extern "C" const char* purify_fast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
