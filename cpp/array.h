// pybind11 array helpers shared by the binding files: shape checks with
// messages that name the argument, and output allocation.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"

namespace ps {
namespace py = pybind11;

template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Raise ValueError unless `a` is 2-D with `cols` columns (cols < 0: any).
inline void check_2d(const py::array& a, py::ssize_t cols, const char* name) {
  if (a.ndim() != 2 || (cols >= 0 && a.shape(1) != cols))
    value_error(std::string(name) + " must be 2-D with " +
                (cols >= 0 ? std::to_string(cols) : std::string("any number of")) +
                " columns; got shape " + shape_str(a));
}

// Raise ValueError unless `a` is 1-D of length `len` (len < 0: any length).
inline void check_1d(const py::array& a, py::ssize_t len, const char* name) {
  if (a.ndim() != 1 || (len >= 0 && a.shape(0) != len))
    value_error(std::string(name) + " must be 1-D" +
                (len >= 0 ? " of length " + std::to_string(len) : std::string()) + "; got shape " +
                shape_str(a));
}

// `a` as a C-contiguous array of T (a copy only when the dtype or layout
// differs). ValueError naming the argument when numpy cannot convert it:
// array_t::ensure returns a null handle then, never to be dereferenced.
template <typename T>
inline carray<T> as_carray(const py::handle& a, const char* name) {
  auto out = carray<T>::ensure(a);
  if (!out)
    value_error(std::string(name) + " cannot be converted to a " +
                py::str(py::dtype::of<T>()).cast<std::string>() + " array");
  return out;
}

template <typename T>
inline py::array_t<T> empty_array(std::vector<py::ssize_t> shape) {
  return py::array_t<T>(shape);
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// ValueError naming both arrays unless they share a dtype.
inline void check_same_dtype(const py::array& a, const py::array& b, const char* na, const char* nb) {
  if (!a.dtype().is(b.dtype()))
    value_error(std::string(na) + " and " + nb + " must have the same dtype; got " + dtype_str(a) + " and " +
                dtype_str(b));
}

// ValueError naming both where a's and b's memory overlap (for C-contiguous
// arrays: the bytes from data() on).
inline void apart(const py::array& a, const char* a_name, const py::array& b, const char* b_name) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return;  // nothing shared (an empty array's pointer is arbitrary)
  const auto* a0 = static_cast<const char*>(a.data());
  const auto* b0 = static_cast<const char*>(b.data());
  if (a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes())
    value_error(std::string(a_name) + " must not share memory with " + b_name);
}

// The one float dtype dispatch of the bindings: fn(float{}) for a float32
// array, fn(double{}) for float64 (the kernels' element type is
// decltype(zero)); ValueError naming `name` for any other dtype.
template <typename Fn>
decltype(auto) dispatch_float(const py::array& a, const char* name, Fn&& fn) {
  if (a.dtype().is(py::dtype::of<float>())) return fn(float{});
  if (a.dtype().is(py::dtype::of<double>())) return fn(double{});
  value_error(std::string(name) + " must be float32 or float64; got dtype " + dtype_str(a));
}

}  // namespace ps
