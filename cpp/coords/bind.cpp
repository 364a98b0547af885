// Coordinate keys: bounds and layouts, packing, unpacking, sorting and uniquing exact
// 64-bit keys.
#include <omp.h>

#include <algorithm>
#include <limits>

#include "array.h"
#include "bind.h"
#include "coords/keys.h"
#include "coords/layout.h"
#include "coords/sort.h"
#include "coords/unique.h"

namespace ps {
namespace {

std::vector<int64_t> fit(std::vector<int64_t> lo, std::vector<int64_t> hi, std::vector<int64_t> margin) {
  if (lo.size() != 4 || hi.size() != 4 || margin.size() != 3)
    value_error("fit_layout takes lo and hi of 4 entries (batch, x, y, z) and 3 margins");
  Bounds b;
  std::copy(lo.begin(), lo.end(), b.lo);
  std::copy(hi.begin(), hi.end(), b.hi);
  if (b.empty()) return layout_fields(KeyLayout());
  for (int f = 0; f < 4; ++f)
    if (b.lo[f] > b.hi[f] || !coord_in_range(b.lo[f]) || !coord_in_range(b.hi[f]))
      value_error("fit_layout bounds must be int32 values with lo <= hi");
  return layout_fields(fit_layout(b, margin.data()));
}

py::array_t<int64_t> bounds(carray<int32_t> coords, int num_threads) {
  check_2d(coords, 4, "coords");
  Bounds b;
  {
    py::gil_scoped_release release;
    b = checked_bounds(coords.data(), coords.shape(0), "coords", threads(num_threads));
  }
  auto out = empty_array<int64_t>({2, 4});
  std::copy(b.lo, b.lo + 4, out.mutable_data());
  std::copy(b.hi, b.hi + 4, out.mutable_data() + 4);
  return out;
}

py::array_t<int64_t> pack_keys(carray<int32_t> coords, std::vector<int64_t> layout_in, int num_threads) {
  check_2d(coords, 4, "coords");
  const KeyLayout layout = layout_from(layout_in);
  const int64_t n = coords.shape(0);
  auto keys = empty_array<int64_t>({n});
  int64_t* k = keys.mutable_data();
  {
    py::gil_scoped_release release;
    pack_rows(coords.data(), n, layout, k, stream_threads(num_threads, n));
  }
  return keys;
}

py::array_t<int32_t> unpack_keys(carray<int64_t> keys, std::vector<int64_t> layout_in, int num_threads) {
  check_1d(keys, -1, "keys");
  const KeyLayout layout = layout_from(layout_in);
  const int64_t n = keys.shape(0);
  auto coords = empty_array<int32_t>({n, 4});
  int32_t* c = coords.mutable_data();
  {
    py::gil_scoped_release release;
    unpack_rows(keys.data(), n, layout, c, stream_threads(num_threads, n));
  }
  return coords;
}

py::tuple sort_keys(carray<int64_t> keys, int num_threads) {
  check_1d(keys, -1, "keys");
  const int64_t n = keys.shape(0);
  const int nt = stream_threads(num_threads, n);  // the checks and scatters; the sort has its own grain
  auto sorted = empty_array<int64_t>({n});
  auto perm = empty_array<int64_t>({n});
  const int64_t* k = keys.data();
  int64_t* s = sorted.mutable_data();
  int64_t* p = perm.mutable_data();
  {
    py::gil_scoped_release release;
    check_keys(k, n, nt, "keys");
    radix_sort_keys(k, n, s, p, threads(num_threads));
  }
  return py::make_tuple(sorted, perm);
}

// Sort, then group equal keys. Returns (unique_keys (M,), inverse (N,),
// perm (N,), seg_ptr (M+1,)): rows perm[seg_ptr[j]:seg_ptr[j+1]] hold key j,
// in their original order; inverse[i] is the group of row i.
py::tuple unique_keys(carray<int64_t> keys, int num_threads) {
  check_1d(keys, -1, "keys");
  const int64_t n = keys.shape(0);
  const int nt = stream_threads(num_threads, n);  // the checks and scatters; the sort has its own grain
  const int64_t* k = keys.data();
  std::vector<int64_t> sorted, starts;
  auto inverse = empty_array<int64_t>({n});
  auto perm = empty_array<int64_t>({n});
  {
    py::gil_scoped_release release;
    check_keys(k, n, nt, "keys");
    group_keys(k, n, sorted, perm.mutable_data(), starts, inverse.mutable_data(), num_threads);
  }
  const int64_t m = int64_t(starts.size()) - 1;
  auto uniq = empty_array<int64_t>({m});
  auto seg = empty_array<int64_t>({m + 1});
  for (int64_t j = 0; j < m; ++j) uniq.mutable_data()[j] = sorted[starts[j]];
  std::copy(starts.begin(), starts.end(), seg.mutable_data());
  return py::make_tuple(uniq, inverse, perm, seg);
}

}  // namespace

void bind_coords(py::module_& m) {
  m.attr("COORD_MIN") = kCoordMin;
  m.attr("COORD_MAX") = kCoordMax;
  m.attr("BATCH_MAX") = kBatchMax;
  m.attr("KEY_BITS") = kKeyBits;
  m.def("coords_bounds", &bounds, py::arg("coords"), py::arg("num_threads"),
        "(2, 4) int64: smallest and largest [batch, x, y, z] (lo > hi without rows); ValueError naming "
        "the first row with a negative batch.");
  m.def("fit_layout", &fit, py::arg("lo"), py::arg("hi"), py::arg("margin"),
        "Key layout (origin x, y, z, bits batch, x, y, z) of rows within [lo, hi], with `margin` spare "
        "values per side of x, y, z when the key still fits; ValueError naming the span that does not.");
  m.def("pack_keys", &pack_keys, py::arg("coords"), py::arg("layout"), py::arg("num_threads"),
        "Pack int32 (N, 4) [batch, x, y, z] rows into exact int64 keys of `layout`; ValueError naming "
        "the first row outside it.");
  m.def("unpack_keys", &unpack_keys, py::arg("keys"), py::arg("layout"), py::arg("num_threads"),
        "Unpack int64 keys of `layout` into int32 (N, 4) [batch, x, y, z] rows.");
  m.def("sort_keys", &sort_keys, py::arg("keys"), py::arg("num_threads"),
        "Stable parallel radix sort: (sorted_keys, perm).");
  m.def("unique_keys", &unique_keys, py::arg("keys"), py::arg("num_threads"),
        "(unique_keys, inverse, perm, seg_ptr) of int64 keys; unique keys ascending.");
}

}  // namespace ps
