// MIMIC attention-map loss, CPU (OpenMP). Math: purify_fast/reference/attention_maps.py.
//
//   s[b,n]  = m[b,n] * sum_c F[b,n,c]^2          a = s_S / max(|s_S|, eps), t likewise
//   loss[b] = sum_n (a - t)^2
//   dL/ds_S = (2(a-t) - a <a, 2(a-t)> [|s_S| > eps]) / max(|s_S|, eps)   (teacher: -2(a-t))
//   dF      = scale * dL/ds * 2F
//
// Shapes: fs [B,N,CS], ft [B,N,CT] contiguous (fp32/fp16/bf16, may differ), mask [B,N] fp32;
// outputs loss_rows [B], gs [B,N], gt [B,N] fp32. gs/gt first hold the energies, then dL/ds.
#include "registry.h"
#include "attention_maps.h"
#include "lane_sum.h"

#include <algorithm>
#include <cmath>

namespace {

void check_fp32_contig(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, name, " has shape ", t.sizes(), ", expected ", shape);
}

void check_map(const at::Tensor& f, const char* name) {
  TORCH_CHECK(f.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(f.dim() == 3, name, " must be [batch, positions, channels], got ", f.sizes());
  TORCH_CHECK(f.is_contiguous(), name, " must be contiguous");
  auto st = f.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

// Channel energy per (row, position), masked; fp32 accumulation whatever the storage dtype.
// (Loops live in templates: an OpenMP pragma cannot sit inside the dispatch macro's argument.)
template <typename scalar_t>
void sq_sums_impl(const scalar_t* x, int64_t BN, int64_t C, const float* mask, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BN; ++i) {
    const scalar_t* row = x + i * C;
    const float acc = purify_fast::lane_sum(C, [&](int64_t c) {
      const float v = static_cast<float>(row[c]);
      return v * v;
    });
    out[i] = acc * mask[i];
  }
}

void sq_sums(const at::Tensor& f, const float* mask, float* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attention_sq_sums", [&] {
    sq_sums_impl<scalar_t>(f.data_ptr<scalar_t>(), f.size(0) * f.size(1), f.size(2), mask, out);
  });
}

template <typename scalar_t>
void grad_impl(const scalar_t* x, const float* g, int64_t BN, int64_t C, float two_scale,
               scalar_t* y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BN; ++i) {
    const float k = two_scale * g[i];
    const scalar_t* xr = x + i * C;
    scalar_t* yr = y + i * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(k * static_cast<float>(xr[c]));
  }
}

void attention_map_forward(const at::Tensor& fs, const at::Tensor& ft, const at::Tensor& mask,
                           double eps, at::Tensor loss_rows, at::Tensor gs, at::Tensor gt) {
  check_map(fs, "fs");
  check_map(ft, "ft");
  const int64_t B = fs.size(0), N = fs.size(1);
  TORCH_CHECK(ft.size(0) == B && ft.size(1) == N, "ft has (batch, positions) (", ft.size(0), ", ",
              ft.size(1), "), fs has (", B, ", ", N, ")");
  check_fp32_contig(mask, "mask", {B, N});
  check_fp32_contig(loss_rows, "loss_rows", {B});
  check_fp32_contig(gs, "gs", {B, N});
  check_fp32_contig(gt, "gt", {B, N});
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);

  const float* m = mask.data_ptr<float>();
  float* ps = gs.data_ptr<float>();
  float* pt = gt.data_ptr<float>();
  float* pl = loss_rows.data_ptr<float>();
  sq_sums(fs, m, ps);
  sq_sums(ft, m, pt);
  const float e = static_cast<float>(eps);

#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    float* s = ps + b * N;
    float* t = pt + b * N;
    // Row sums in double: N can be thousands of positions (H*W of a CNN map).
    double sq_s = 0, sq_t = 0;
    for (int64_t n = 0; n < N; ++n) {
      sq_s += double(s[n]) * s[n];
      sq_t += double(t[n]) * t[n];
    }
    const float norm_s = static_cast<float>(std::sqrt(sq_s));
    const float norm_t = static_cast<float>(std::sqrt(sq_t));
    const float den_s = std::max(norm_s, e), den_t = std::max(norm_t, e);
    double loss = 0, dot_s = 0, dot_t = 0;
    for (int64_t n = 0; n < N; ++n) {
      const float a = s[n] / den_s, tt = t[n] / den_t, d = a - tt;
      loss += double(d) * d;
      dot_s += double(a) * (2.f * d);
      dot_t += double(tt) * (-2.f * d);
    }
    pl[b] = static_cast<float>(loss);
    // Below eps the normaliser is the constant eps, so the projection term drops out.
    const float proj_s = norm_s > e ? static_cast<float>(dot_s) : 0.f;
    const float proj_t = norm_t > e ? static_cast<float>(dot_t) : 0.f;
    for (int64_t n = 0; n < N; ++n) {
      const float a = s[n] / den_s, tt = t[n] / den_t, d = a - tt;
      s[n] = (2.f * d - a * proj_s) / den_s;
      t[n] = (-2.f * d - tt * proj_t) / den_t;
    }
  }
}

void attention_map_backward(const at::Tensor& f, const at::Tensor& g, double scale,
                            at::Tensor out) {
  check_map(f, "f");
  const int64_t B = f.size(0), N = f.size(1), C = f.size(2);
  check_fp32_contig(g, "g", {B, N});
  TORCH_CHECK(out.sizes() == f.sizes() && out.scalar_type() == f.scalar_type() &&
                  out.is_contiguous() && out.device().is_cpu(),
              "out must be a contiguous CPU tensor like f (", f.sizes(), ", ", f.scalar_type(), ")");
  const float* pg = g.data_ptr<float>();
  const float two_scale = static_cast<float>(2.0 * scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attention_map_backward", [&] {
    grad_impl<scalar_t>(f.data_ptr<scalar_t>(), pg, B * N, C, two_scale, out.data_ptr<scalar_t>());
  });
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_attention_map_ops(m, {&attention_map_forward, &attention_map_backward});
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
