// One declaration per area; each area's bind.cpp converts arrays, checks
// bounds, releases the GIL and calls its kernels. ext.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace ps {
void bind_coords(pybind11::module_& m);
void bind_voxelize(pybind11::module_& m);
void bind_kmap(pybind11::module_& m);
void bind_conv(pybind11::module_& m);
void bind_spmm(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
}  // namespace ps
