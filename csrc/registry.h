// One registry of op families per extension module. Each family's .cpp file registers its
// functions with a static `RegisterOps` object, so the single binding file stays untouched when a
// family is added (the static initialisers run when the shared object is loaded, before PyInit).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace purify_fast {

using Registrar = void (*)(pybind11::module_&);

inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}

struct RegisterOps {
  explicit RegisterOps(Registrar r) { registrars().push_back(r); }
};

}  // namespace purify_fast
