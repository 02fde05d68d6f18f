// The weight-space ops as Python sees them. purify_fast._C (weight_space.cpp, CPU) and
// purify_fast._C_cuda (weight_space_cuda_binding.cpp) each implement these functions and register
// them through def_weight_space_ops, so the names, argument names and docstrings are written once
// and the two backends cannot drift apart: a wrapper whose C++ signature differs from the one
// below does not compile.
#pragma once

#include <torch/extension.h>

namespace purify_fast {

struct WeightSpaceOps {
  void (*mix_random)(const torch::Tensor& pre, const torch::Tensor& ft, const torch::Tensor& out,
                     int64_t seed_word, int64_t key_word, int64_t keep_threshold);
  void (*fisher_accumulate_)(const torch::Tensor& acc, const torch::Tensor& grad, double scale);
  void (*score_histogram)(const torch::Tensor& pre, const torch::Tensor& ft,
                          const c10::optional<torch::Tensor>& hessian, int64_t indicator,
                          double eps, const torch::Tensor& hist, int64_t prefix);
  void (*select_by_score)(const torch::Tensor& pre, const torch::Tensor& ft,
                          const c10::optional<torch::Tensor>& hessian, int64_t indicator,
                          double eps, double threshold, bool selected_takes_finetuned,
                          const torch::Tensor& out);
  void (*embedding_drift_scores)(const torch::Tensor& pre, const torch::Tensor& ft,
                                 const torch::Tensor& freqs, double c, const torch::Tensor& out);
  bool (*all_finite)(const torch::Tensor& t);
};

inline void def_weight_space_ops(pybind11::module_& m, const WeightSpaceOps& ops) {
  namespace py = pybind11;
  m.def("mix_random", ops.mix_random, "Philox Bernoulli(rho) select: out = keep ? ft : pre",
        py::arg("pre"), py::arg("ft"), py::arg("out"), py::arg("seed_word"), py::arg("key_word"),
        py::arg("keep_threshold"));
  m.def("fisher_accumulate_", ops.fisher_accumulate_,
        "acc += scale * grad^2 (fp32 acc, in place)", py::arg("acc"), py::arg("grad"),
        py::arg("scale"));
  m.def("score_histogram", ops.score_histogram,
        "Accumulate the radix-select histogram of fp32 score bit patterns into hist",
        py::arg("pre"), py::arg("ft"), py::arg("hessian"), py::arg("indicator"), py::arg("eps"),
        py::arg("hist"), py::arg("prefix"));
  m.def("select_by_score", ops.select_by_score,
        "out = (score >= threshold) == selected_takes_finetuned ? ft : pre", py::arg("pre"),
        py::arg("ft"), py::arg("hessian"), py::arg("indicator"), py::arg("eps"),
        py::arg("threshold"), py::arg("selected_takes_finetuned"), py::arg("out"));
  m.def("embedding_drift_scores", ops.embedding_drift_scores,
        "E-PUR: ||ft[i]-pre[i]||_2 / log(max(freqs[i], c)) per row into out (fp32)",
        py::arg("pre"), py::arg("ft"), py::arg("freqs"), py::arg("c"), py::arg("out"));
  m.def("all_finite", ops.all_finite, "True when no element is NaN or +-Inf", py::arg("t"));
}

}  // namespace purify_fast
