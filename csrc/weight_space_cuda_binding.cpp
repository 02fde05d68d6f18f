// Torch wrappers of the weight-space CUDA launchers (csrc/weight_space.cu) for purify_fast._C_cuda:
// argument checks, the device guard and the current stream; the kernels themselves see only raw
// pointers. Same function names and signatures as the CPU module purify_fast._C.
#include "registry.h"
#include "weight_space.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>

extern "C" {
int pf_ws_mix_random(const void* pre, const void* ft, void* out, int64_t n, int dtype, uint32_t k0,
                     uint32_t k1, uint64_t keep_threshold, cudaStream_t stream);
int pf_ws_fisher_accumulate(float* acc, const void* grad, int64_t n, int dtype, float scale,
                            cudaStream_t stream);
int pf_ws_score_histogram(const void* pre, const void* ft, const float* hessian, int64_t n,
                          int dtype, int indicator, float eps, int64_t* hist, int prefix,
                          cudaStream_t stream);
int pf_ws_select_by_score(const void* pre, const void* ft, const float* hessian, int64_t n,
                          int dtype, int indicator, float eps, float threshold, int take_ft,
                          void* out, cudaStream_t stream);
int pf_ws_embedding_drift_scores(const void* pre, const void* ft, const float* freqs, int64_t rows,
                                 int64_t dim, int dtype, float c, float* out, cudaStream_t stream);
int pf_ws_all_finite(const void* x, int64_t n, int dtype, int* flag, cudaStream_t stream);
}

namespace {

int dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_flat(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (the cuda backend), got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but pre is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const torch::Tensor& pre, const torch::Tensor& t, const char* name) {
  check_flat(t, name, pre);
  TORCH_CHECK(t.numel() == pre.numel(), name, " has ", t.numel(), " elements but pre has ", pre.numel());
  TORCH_CHECK(t.scalar_type() == pre.scalar_type(), name, " dtype ", t.scalar_type(),
              " differs from pre dtype ", pre.scalar_type());
}

const float* hessian_ptr(const c10::optional<torch::Tensor>& hessian, const torch::Tensor& pre,
                         int64_t indicator) {
  TORCH_CHECK(indicator >= 0 && indicator <= 3, "indicator must be 0..3 (drift_over_hessian, drift, "
              "inv_hessian, product), got ", indicator);
  if (!hessian.has_value()) {
    TORCH_CHECK(indicator == 1, "indicator ", indicator, " needs a hessian tensor (got None)");
    return nullptr;
  }
  check_flat(*hessian, "hessian", pre);
  TORCH_CHECK(hessian->scalar_type() == at::kFloat, "hessian must be float32, got ",
              hessian->scalar_type());
  TORCH_CHECK(hessian->numel() == pre.numel(), "hessian has ", hessian->numel(),
              " elements but pre has ", pre.numel());
  return indicator == 1 ? nullptr : hessian->data_ptr<float>();
}

void check_launch(int rc, const char* op) {
  TORCH_CHECK(rc == 0, op, " failed: ",
              rc < 0 ? "unsupported dtype or indicator code"
                     : cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void mix_random(const torch::Tensor& pre, const torch::Tensor& ft, const torch::Tensor& out,
                int64_t seed_word, int64_t key_word, int64_t keep_threshold) {
  check_flat(pre, "pre", pre);
  const int dt = dtype_code(pre, "pre");
  check_same(pre, ft, "ft");
  check_same(pre, out, "out");
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= (int64_t{1} << 32),
              "keep_threshold must be in [0, 2**32], got ", keep_threshold);
  TORCH_CHECK(key_word >= 0 && key_word <= 0xFFFFFFFFll, "key_word must be a uint32, got ", key_word);
  const c10::cuda::CUDAGuard guard(pre.device());
  check_launch(pf_ws_mix_random(pre.data_ptr(), ft.data_ptr(), out.data_ptr(), pre.numel(), dt,
                                static_cast<uint32_t>(seed_word & 0xFFFFFFFFll),
                                static_cast<uint32_t>(key_word),
                                static_cast<uint64_t>(keep_threshold), stream()),
               "mix_random");
}

void fisher_accumulate_(const torch::Tensor& acc, const torch::Tensor& grad, double scale) {
  check_flat(acc, "acc", acc);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "acc must be float32, got ", acc.scalar_type());
  check_flat(grad, "grad", acc);
  const int dt = dtype_code(grad, "grad");
  TORCH_CHECK(grad.numel() == acc.numel(), "grad has ", grad.numel(), " elements but acc has ",
              acc.numel());
  const c10::cuda::CUDAGuard guard(acc.device());
  check_launch(pf_ws_fisher_accumulate(acc.data_ptr<float>(), grad.data_ptr(), acc.numel(), dt,
                                       static_cast<float>(scale), stream()),
               "fisher_accumulate_");
}

void score_histogram(const torch::Tensor& pre, const torch::Tensor& ft,
                     const c10::optional<torch::Tensor>& hessian, int64_t indicator, double eps,
                     const torch::Tensor& hist, int64_t prefix) {
  check_flat(pre, "pre", pre);
  const int dt = dtype_code(pre, "pre");
  check_same(pre, ft, "ft");
  const float* h = hessian_ptr(hessian, pre, indicator);
  check_flat(hist, "hist", pre);
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.numel() == 65536,
              "hist must be int64 with 65536 bins, got ", hist.scalar_type(), " with ", hist.numel());
  TORCH_CHECK(prefix < 32768, "prefix must be < 32768 (scores are >= 0) or negative for level 1, got ",
              prefix);
  const c10::cuda::CUDAGuard guard(pre.device());
  check_launch(pf_ws_score_histogram(pre.data_ptr(), ft.data_ptr(), h, pre.numel(), dt,
                                     static_cast<int>(indicator), static_cast<float>(eps),
                                     hist.data_ptr<int64_t>(), prefix < 0 ? -1 : static_cast<int>(prefix),
                                     stream()),
               "score_histogram");
}

void select_by_score(const torch::Tensor& pre, const torch::Tensor& ft,
                     const c10::optional<torch::Tensor>& hessian, int64_t indicator, double eps,
                     double threshold, bool selected_takes_finetuned, const torch::Tensor& out) {
  check_flat(pre, "pre", pre);
  const int dt = dtype_code(pre, "pre");
  check_same(pre, ft, "ft");
  check_same(pre, out, "out");
  const float* h = hessian_ptr(hessian, pre, indicator);
  const c10::cuda::CUDAGuard guard(pre.device());
  check_launch(pf_ws_select_by_score(pre.data_ptr(), ft.data_ptr(), h, pre.numel(), dt,
                                     static_cast<int>(indicator), static_cast<float>(eps),
                                     static_cast<float>(threshold), selected_takes_finetuned ? 1 : 0,
                                     out.data_ptr(), stream()),
               "select_by_score");
}

void embedding_drift_scores(const torch::Tensor& pre, const torch::Tensor& ft,
                            const torch::Tensor& freqs, double c, const torch::Tensor& out) {
  check_flat(pre, "pre", pre);
  const int dt = dtype_code(pre, "pre");
  TORCH_CHECK(pre.dim() == 2, "pre must be 2-D [vocab, dim], got ", pre.dim(), "-D");
  check_same(pre, ft, "ft");
  TORCH_CHECK(ft.sizes() == pre.sizes(), "ft shape ", ft.sizes(), " differs from pre shape ", pre.sizes());
  const int64_t rows = pre.size(0);
  check_flat(freqs, "freqs", pre);
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.numel() == rows,
              "freqs must be float32 with one entry per row (", rows, "), got ", freqs.scalar_type(),
              " with ", freqs.numel());
  check_flat(out, "out", pre);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == rows,
              "out must be float32 with one entry per row (", rows, "), got ", out.scalar_type(),
              " with ", out.numel());
  const c10::cuda::CUDAGuard guard(pre.device());
  check_launch(pf_ws_embedding_drift_scores(pre.data_ptr(), ft.data_ptr(), freqs.data_ptr<float>(),
                                            rows, pre.size(1), dt, static_cast<float>(c),
                                            out.data_ptr<float>(), stream()),
               "embedding_drift_scores");
}

bool all_finite(const torch::Tensor& t) {
  check_flat(t, "t", t);
  int dt;
  switch (t.scalar_type()) {
    case at::kFloat: dt = 0; break;
    case at::kHalf: dt = 1; break;
    case at::kBFloat16: dt = 2; break;
    case at::kDouble: dt = 3; break;
    default:
      TORCH_CHECK(false, "t must be a floating-point tensor (float32/16, bfloat16, float64), got ",
                  t.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(t.device());
  auto flag = torch::empty({1}, t.options().dtype(at::kInt));
  check_launch(pf_ws_all_finite(t.data_ptr(), t.numel(), dt, flag.data_ptr<int>(), stream()),
               "all_finite");
  return flag.item<int>() == 0;  // .item() synchronises with the stream
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_weight_space_ops(
      m, {&mix_random, &fisher_accumulate_, &score_histogram, &select_by_score,
          &embedding_drift_scores, &all_finite});
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
