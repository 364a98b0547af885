// The `isa` argument of the kernel bindings (conv and SpMM): which build of
// the kernels a call runs.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "common.h"
#include "isa.h"

namespace ps {

// None: the best build that runs here; "generic" / "avx2" / "avx512": that
// build, a ValueError where it does not run; a bool is the former `portable`
// flag (True: "generic", False: None).
inline Isa isa_arg(const pybind11::object& isa, const char* name = "isa") {
  if (isa.is_none()) return best_isa();
  if (pybind11::isinstance<pybind11::bool_>(isa)) return isa.cast<bool>() ? Isa::generic : best_isa();
  if (!pybind11::isinstance<pybind11::str>(isa))
    throw pybind11::type_error(std::string(name) + " must be None or a str ('generic', 'avx2', 'avx512')");
  const std::string s = isa.cast<std::string>();
  if (s.empty()) value_error(std::string(name) + " must not be empty");
  return isa_from_name(s, name);
}

}  // namespace ps
