// C++/OpenMP CPU kernels of the multi-scale LoRA (MSLR) linear op (module purify_fast._C).
//
// Contract: purify_fast/ops/multiscale_lora.py; math: purify_fast/reference/multiscale_lora.py.
//
//   mslora_project(x[M,K], l[Q,K], s[Q,Q] fp32, v[M,Q] fp32):   v = (x·lᵀ)·sᵀ
//   mslora_linear(x[M,K], w[N,K], b[N]|None, v[M,Q] fp32, r[N,Q], y[M,N]):  y = x·wᵀ + b + v·rᵀ
//
// The big GEMM x·wᵀ goes to at::addmm_ (oneDNN/MKL, which handles transposed views without a
// copy, so the backward's wᵀ = W costs nothing). The low-rank path is fused around it: one
// OpenMP pass writes y = b + v·rᵀ (rank-Q update, fp32 math, one cast), and the GEMM then
// accumulates into y with beta = 1. Compared with PEFT-style eager code (base output, a separate
// low-rank output, scale, add), y is written once by us and read+written once by the GEMM, and
// no [M, N] temporary exists. The dense R·S·L is never formed.
#include "registry.h"
#include "multiscale_lora.h"
#include "lane_sum.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// One row of x against every rank row of l (fp32, contiguous [Q, K]), then the Q×Q mixing.
template <typename T>
void project_rows(const T* x, int64_t m0, int64_t m1, int64_t k, int64_t q, const float* l,
                  const float* s, float* v) {
  std::vector<float> row(k), u(q);
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = x + m * k;
    for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(xr[i]);
    const float* xf = row.data();
    for (int64_t t = 0; t < q; ++t) {
      const float* lt = l + t * k;
      u[t] = purify_fast::lane_sum(k, [&](int64_t i) { return xf[i] * lt[i]; });
    }
    float* vr = v + m * q;
    for (int64_t j = 0; j < q; ++j) {
      const float* sj = s + j * q;
      float acc = 0.f;
      for (int64_t t = 0; t < q; ++t) acc += sj[t] * u[t];
      vr[j] = acc;
    }
  }
}

void mslora_project(const at::Tensor& x_in, const at::Tensor& l_in, const at::Tensor& s_in,
                    at::Tensor& v) {
  check_2d(x_in, "x");
  check_2d(l_in, "l");
  check_2d(s_in, "s");
  check_2d(v, "v");
  const int64_t m = x_in.size(0), k = x_in.size(1), q = l_in.size(0);
  TORCH_CHECK(l_in.size(1) == k, "l must be [Q, ", k, "], got ", l_in.sizes());
  TORCH_CHECK(s_in.size(0) == q && s_in.size(1) == q, "s must be [", q, ", ", q, "]");
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.size(0) == m &&
                  v.size(1) == q,
              "v must be a contiguous float32 [", m, ", ", q, "] tensor");
  const at::Tensor x = x_in.contiguous();
  // l and s are tiny (Q rows): one fp32 copy keeps the inner loop free of conversions.
  const at::Tensor l = l_in.to(at::kFloat).contiguous();
  const at::Tensor s = s_in.to(at::kFloat).contiguous();
  const float* lp = l.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  // Grain: enough rows per task that a task streams at least ~64 KiB of x.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mslora_project", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, m, grain, [&](int64_t m0, int64_t m1) {
      project_rows<scalar_t>(xp, m0, m1, k, q, lp, sp, vp);
    });
  });
}

template <typename T>
void lowrank_fill_rows(T* y, int64_t m0, int64_t m1, int64_t n, int64_t q, const float* v,
                       const float* rt, const float* b) {
  std::vector<float> acc(n);
  for (int64_t m = m0; m < m1; ++m) {
    if (b != nullptr) {
      for (int64_t j = 0; j < n; ++j) acc[j] = b[j];
    } else {
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.f;
    }
    const float* vr = v + m * q;
    for (int64_t t = 0; t < q; ++t) {
      const float c = vr[t];
      const float* rr = rt + t * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += c * rr[j];
    }
    T* yr = y + m * n;
    for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>(acc[j]);
  }
}

void mslora_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                   const at::Tensor& v_in, const at::Tensor& r, at::Tensor& y) {
  check_2d(x, "x");
  check_2d(w, "w");
  check_2d(v_in, "v");
  check_2d(r, "r");
  check_2d(y, "y");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0), q = v_in.size(1);
  TORCH_CHECK(w.size(1) == k, "w must be [N, ", k, "], got ", w.sizes());
  TORCH_CHECK(v_in.size(0) == m, "v must have ", m, " rows, got ", v_in.size(0));
  TORCH_CHECK(r.size(0) == n && r.size(1) == q, "r must be [", n, ", ", q, "], got ", r.sizes());
  TORCH_CHECK(y.size(0) == m && y.size(1) == n && y.is_contiguous() &&
                  y.scalar_type() == x.scalar_type(),
              "y must be a contiguous [", m, ", ", n, "] tensor of x's dtype");
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  // rᵀ in fp32 ([Q, N], small) so the rank-Q update streams contiguous rows.
  const at::Tensor rt = r.to(at::kFloat).t().contiguous();
  at::Tensor bf;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == n, "b must be [", n, "]");
    bf = b->to(at::kFloat).contiguous();
  }
  const float* vp = v.data_ptr<float>();
  const float* rp = rt.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "mslora_linear", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, m, grain, [&](int64_t m0, int64_t m1) {
      lowrank_fill_rows<scalar_t>(yp, m0, m1, n, q, vp, rp, bp);
    });
  });
  y.addmm_(x, w.t());
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_multiscale_lora_ops(m, {&mslora_project, &mslora_linear});
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
