// Coordinate keys: packing, unpacking, sorting and uniquing exact 64-bit keys.
#include <omp.h>

#include <algorithm>
#include <limits>

#include "array.h"
#include "bind.h"
#include "coords/sort.h"

namespace ps {
namespace {

// Index of the first row whose coordinates cannot be packed, or -1.
int64_t first_bad_row(const int32_t* c, int64_t n, int nt) {
  int64_t bad = std::numeric_limits<int64_t>::max();
#pragma omp parallel for num_threads(nt) reduction(min : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    if (!batch_in_range(r[0]) || !coord_in_range(r[1]) || !coord_in_range(r[2]) ||
        !coord_in_range(r[3]))
      bad = std::min(bad, i);
  }
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

py::array_t<int64_t> pack_keys(carray<int32_t> coords, int num_threads) {
  check_2d(coords, 4, "coords");
  const int64_t n = coords.shape(0);
  const int nt = threads(num_threads, n);
  const int32_t* c = coords.data();
  auto keys = empty_array<int64_t>({n});
  int64_t* k = keys.mutable_data();
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = first_bad_row(c, n, nt);
    if (bad < 0) {
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const int32_t* r = c + 4 * i;
        k[i] = pack_key(r[0], r[1], r[2], r[3]);
      }
    }
  }
  if (bad >= 0) {
    const int32_t* r = c + 4 * bad;
    value_error("coords row " + std::to_string(bad) + " = [" + std::to_string(r[0]) + ", " +
                std::to_string(r[1]) + ", " + std::to_string(r[2]) + ", " +
                std::to_string(r[3]) + "] is outside the representable range: batch in [0, " +
                std::to_string(kBatchMax) + "], x, y, z in [" + std::to_string(kCoordMin) +
                ", " + std::to_string(kCoordMax) + "]");
  }
  return keys;
}

void check_keys(const int64_t* k, int64_t n, int nt, const char* name) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(nt) reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad += (k[i] < 0);
  if (bad) value_error(std::string(name) + " must be non-negative packed coordinate keys");
}

py::array_t<int32_t> unpack_keys(carray<int64_t> keys, int num_threads) {
  check_1d(keys, -1, "keys");
  const int64_t n = keys.shape(0);
  const int nt = threads(num_threads, n);
  auto coords = empty_array<int32_t>({n, 4});
  const int64_t* k = keys.data();
  int32_t* c = coords.mutable_data();
  {
    py::gil_scoped_release release;
    check_keys(k, n, nt, "keys");
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) unpack_key(k[i], c + 4 * i);
  }
  return coords;
}

py::tuple sort_keys(carray<int64_t> keys, int num_threads) {
  check_1d(keys, -1, "keys");
  const int64_t n = keys.shape(0);
  const int nt = threads(num_threads, n);
  auto sorted = empty_array<int64_t>({n});
  auto perm = empty_array<int64_t>({n});
  const int64_t* k = keys.data();
  int64_t* s = sorted.mutable_data();
  int64_t* p = perm.mutable_data();
  {
    py::gil_scoped_release release;
    check_keys(k, n, nt, "keys");
    radix_sort_keys(k, n, s, p, nt);
  }
  return py::make_tuple(sorted, perm);
}

// Sort, then group equal keys. Returns (unique_keys (M,), inverse (N,),
// perm (N,), seg_ptr (M+1,)): rows perm[seg_ptr[j]:seg_ptr[j+1]] hold key j,
// in their original order; inverse[i] is the group of row i.
py::tuple unique_keys(carray<int64_t> keys, int num_threads) {
  check_1d(keys, -1, "keys");
  const int64_t n = keys.shape(0);
  const int nt = threads(num_threads, n);
  const int64_t* k = keys.data();
  std::vector<int64_t> sorted(n), perm(n), starts;
  auto inverse = empty_array<int64_t>({n});
  int64_t* inv = inverse.mutable_data();
  {
    py::gil_scoped_release release;
    check_keys(k, n, nt, "keys");
    radix_sort_keys(k, n, sorted.data(), perm.data(), nt);
    starts.reserve(n + 1);
    for (int64_t i = 0; i < n; ++i)
      if (i == 0 || sorted[i] != sorted[i - 1]) starts.push_back(i);
    starts.push_back(n);
    const int64_t m = int64_t(starts.size()) - 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = starts[j]; i < starts[j + 1]; ++i) inv[perm[i]] = j;
  }
  const int64_t m = int64_t(starts.size()) - 1;
  auto uniq = empty_array<int64_t>({m});
  auto seg = empty_array<int64_t>({m + 1});
  auto perm_out = empty_array<int64_t>({n});
  for (int64_t j = 0; j < m; ++j) uniq.mutable_data()[j] = sorted[starts[j]];
  std::copy(starts.begin(), starts.end(), seg.mutable_data());
  std::copy(perm.begin(), perm.end(), perm_out.mutable_data());
  return py::make_tuple(uniq, inverse, perm_out, seg);
}

}  // namespace

void bind_coords(py::module_& m) {
  m.attr("COORD_MIN") = kCoordMin;
  m.attr("COORD_MAX") = kCoordMax;
  m.attr("BATCH_MAX") = kBatchMax;
  m.attr("COORD_BITS") = kCoordBits;
  m.def("pack_keys", &pack_keys, py::arg("coords"), py::arg("num_threads"),
        "Pack int32 (N, 4) [batch, x, y, z] rows into exact int64 keys; ValueError out of range.");
  m.def("unpack_keys", &unpack_keys, py::arg("keys"), py::arg("num_threads"),
        "Unpack int64 keys into int32 (N, 4) [batch, x, y, z] rows.");
  m.def("sort_keys", &sort_keys, py::arg("keys"), py::arg("num_threads"),
        "Stable parallel radix sort: (sorted_keys, perm).");
  m.def("unique_keys", &unique_keys, py::arg("keys"), py::arg("num_threads"),
        "(unique_keys, inverse, perm, seg_ptr) of int64 keys; unique keys ascending.");
}

}  // namespace ps
