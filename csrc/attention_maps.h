// The MIMIC attention-map ops as Python sees them, implemented by attention_maps.cpp (CPU,
// purify_fast._C) and attention_maps_cuda_binding.cpp (CUDA, purify_fast._C_cuda) and registered
// by both through def_attention_map_ops: one place for names, argument names and docstrings, and a
// compile error where a backend's wrapper signature differs.
#pragma once

#include <torch/extension.h>

namespace purify_fast {

struct AttentionMapOps {
  void (*attention_map_forward)(const at::Tensor& fs, const at::Tensor& ft, const at::Tensor& mask,
                                double eps, at::Tensor loss_rows, at::Tensor gs, at::Tensor gt);
  void (*attention_map_backward)(const at::Tensor& f, const at::Tensor& g, double scale,
                                 at::Tensor out);
};

inline void def_attention_map_ops(pybind11::module_& m, const AttentionMapOps& ops) {
  namespace py = pybind11;
  m.def("attention_map_forward", ops.attention_map_forward,
        "MIMIC attention-map row losses and dL/ds of one layer", py::arg("fs"), py::arg("ft"),
        py::arg("mask"), py::arg("eps"), py::arg("loss_rows"), py::arg("gs"), py::arg("gt"));
  m.def("attention_map_backward", ops.attention_map_backward,
        "out = scale * g * 2f, the attention-map gradient of one layer's features", py::arg("f"),
        py::arg("g"), py::arg("scale"), py::arg("out"));
}

}  // namespace purify_fast
