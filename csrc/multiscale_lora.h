// The multi-scale LoRA (MSLR) ops as Python sees them, implemented by multiscale_lora.cpp (CPU:
// fused rank-Q fill + at::addmm_, purify_fast._C) and multiscale_lora_cuda_binding.cpp (CUDA +
// cuBLAS, purify_fast._C_cuda) and registered by both through def_multiscale_lora_ops: one place
// for names, argument names and docstrings, and a compile error where a backend's wrapper
// signature differs.
#pragma once

#include <torch/extension.h>

namespace purify_fast {

struct MultiscaleLoraOps {
  void (*mslora_project)(const at::Tensor& x, const at::Tensor& l, const at::Tensor& s,
                         at::Tensor& v);
  void (*mslora_linear)(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& b, const at::Tensor& v,
                        const at::Tensor& r, at::Tensor& y);
};

inline void def_multiscale_lora_ops(pybind11::module_& m, const MultiscaleLoraOps& ops) {
  namespace py = pybind11;
  m.def("mslora_project", ops.mslora_project, "MSLR projection v[M,Q] (fp32) = (x[M,K]·lᵀ)·sᵀ",
        py::arg("x"), py::arg("l"), py::arg("s"), py::arg("out"));
  m.def("mslora_linear", ops.mslora_linear, "MSLR linear y = x·wᵀ + b + v·rᵀ", py::arg("x"),
        py::arg("w"), py::arg("b"), py::arg("v"), py::arg("r"), py::arg("out"));
}

}  // namespace purify_fast
