// Binding of the MSLR CUDA launchers (csrc/multiscale_lora.cu) into purify_fast._C_cuda, with the
// contract of purify_fast/ops/multiscale_lora.py. Built only where torch has CUDA and nvcc exists.
#include "registry.h"
#include "multiscale_lora.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>

extern "C" cudaError_t purify_fast_mslora_project(const void* x, int dtype, const float* l,
                                                  const float* s, float* v, int64_t m, int64_t k,
                                                  int q, cudaStream_t stream);
extern "C" cudaError_t purify_fast_mslora_lowrank_fill(void* y, int dtype, const float* v,
                                                       const float* rt, const float* b, int64_t m,
                                                       int64_t n, int q, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "MSLR CUDA kernels take float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void mslora_project(const at::Tensor& x_in, const at::Tensor& l_in, const at::Tensor& s_in,
                    at::Tensor& v) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "x must be a 2-D CUDA tensor");
  const int64_t m = x_in.size(0), k = x_in.size(1), q = l_in.size(0);
  TORCH_CHECK(l_in.dim() == 2 && l_in.size(1) == k, "l must be [Q, ", k, "]");
  TORCH_CHECK(q >= 1 && q <= 64, "the MSLR CUDA kernels support 1 <= n_scales·r_in <= 64, got ",
              q, " (use backend='triton')");
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == q && s_in.size(1) == q, "s must be [Q, Q]");
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.size(0) == m &&
                  v.size(1) == q, "v must be a contiguous float32 [M, Q] tensor");
  // The kernel runs on the current device's stream: make that x's device.
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor l = l_in.to(at::kFloat).contiguous();
  const at::Tensor s = s_in.to(at::kFloat).contiguous();
  check_cuda(purify_fast_mslora_project(x.data_ptr(), dtype_code(x), l.data_ptr<float>(),
                                        s.data_ptr<float>(), v.data_ptr<float>(), m, k,
                                        static_cast<int>(q), at::cuda::getCurrentCUDAStream()),
             "mslora_project");
}

void mslora_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                   const at::Tensor& v_in, const at::Tensor& r, at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && w.dim() == 2, "x and w must be 2-D CUDA tensors");
  const int64_t m = x.size(0), n = w.size(0), q = v_in.size(1);
  TORCH_CHECK(w.size(1) == x.size(1), "w must be [N, K] with K = x.size(1)");
  TORCH_CHECK(q >= 1 && q <= 64, "the MSLR CUDA kernels support 1 <= n_scales·r_in <= 64, got ", q);
  TORCH_CHECK(r.dim() == 2 && r.size(0) == n && r.size(1) == q, "r must be [N, Q]");
  TORCH_CHECK(y.is_contiguous() && y.size(0) == m && y.size(1) == n &&
                  y.scalar_type() == x.scalar_type(), "y must be a contiguous [M, N] tensor of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  const at::Tensor rt = r.to(at::kFloat).t().contiguous();
  at::Tensor bf;
  if (b.has_value() && b->defined()) bf = b->to(at::kFloat).contiguous();
  check_cuda(purify_fast_mslora_lowrank_fill(y.data_ptr(), dtype_code(y), v.data_ptr<float>(),
                                             rt.data_ptr<float>(),
                                             bf.defined() ? bf.data_ptr<float>() : nullptr, m, n,
                                             static_cast<int>(q), at::cuda::getCurrentCUDAStream()),
             "mslora_lowrank_fill");
  // cuBLAS accumulates the base GEMM into the filled y (beta = 1); wᵀ of a transposed view is a
  // plain layout flag for cuBLAS, so the backward's W costs no copy.
  y.addmm_(x, w.t());
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_multiscale_lora_ops(m, {&mslora_project, &mslora_linear});
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
