// Binding of the attention-map CUDA launchers (csrc/attention_maps.cu) into purify_fast._C_cuda,
// with the contract of purify_fast/ops/attention_maps.py. Built only where torch has CUDA and
// nvcc exists.
#include "registry.h"
#include "attention_maps.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>

extern "C" cudaError_t purify_fast_attention_map_forward(
    const void* fs, int fs_dtype, const void* ft, int ft_dtype, const float* mask, int64_t b,
    int64_t n, int64_t cs, int64_t ct, float eps, float* loss_rows, float* gs, float* gt,
    cudaStream_t stream);
extern "C" cudaError_t purify_fast_attention_map_backward(const void* f, int dtype, const float* g,
                                                          int64_t b, int64_t n, int64_t c,
                                                          float scale, void* out,
                                                          cudaStream_t stream);

namespace {

int map_dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, name, ": the attention-map CUDA kernels take float32, float16 or "
                         "bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_map(const at::Tensor& f, const char* name) {
  TORCH_CHECK(f.is_cuda() && f.dim() == 3 && f.is_contiguous(), name,
              " must be a contiguous [batch, positions, channels] CUDA tensor, got ", f.sizes());
}

void check_fp32(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == shape && t.device() == like.device(),
              name, " must be a contiguous float32 CUDA tensor of shape ", shape, " on ",
              like.device());
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void attention_map_forward(const at::Tensor& fs, const at::Tensor& ft, const at::Tensor& mask,
                           double eps, at::Tensor loss_rows, at::Tensor gs, at::Tensor gt) {
  check_map(fs, "fs");
  check_map(ft, "ft");
  const int64_t b = fs.size(0), n = fs.size(1);
  TORCH_CHECK(ft.size(0) == b && ft.size(1) == n && ft.device() == fs.device(),
              "ft must share fs's (batch, positions) and device");
  check_fp32(mask, "mask", {b, n}, fs);
  check_fp32(loss_rows, "loss_rows", {b}, fs);
  check_fp32(gs, "gs", {b, n}, fs);
  check_fp32(gt, "gt", {b, n}, fs);
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard guard(fs.device());
  check_cuda(purify_fast_attention_map_forward(
                 fs.data_ptr(), map_dtype_code(fs, "fs"), ft.data_ptr(), map_dtype_code(ft, "ft"),
                 mask.data_ptr<float>(), b, n, fs.size(2), ft.size(2), static_cast<float>(eps),
                 loss_rows.data_ptr<float>(), gs.data_ptr<float>(), gt.data_ptr<float>(),
                 at::cuda::getCurrentCUDAStream()),
             "attention_map_forward");
}

void attention_map_backward(const at::Tensor& f, const at::Tensor& g, double scale,
                            at::Tensor out) {
  check_map(f, "f");
  const int64_t b = f.size(0), n = f.size(1), c = f.size(2);
  check_fp32(g, "g", {b, n}, f);
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.sizes() == f.sizes() &&
                  out.scalar_type() == f.scalar_type() && out.device() == f.device(),
              "out must be a contiguous CUDA tensor like f");
  const c10::cuda::CUDAGuard guard(f.device());
  check_cuda(purify_fast_attention_map_backward(f.data_ptr(), map_dtype_code(f, "f"),
                                                g.data_ptr<float>(), b, n, c,
                                                static_cast<float>(scale), out.data_ptr(),
                                                at::cuda::getCurrentCUDAStream()),
             "attention_map_backward");
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_attention_map_ops(m, {&attention_map_forward, &attention_map_backward});
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
