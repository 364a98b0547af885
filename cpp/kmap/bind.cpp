// Kernel maps: bindings. Checks every shape and range before any parallel
// region, releases the GIL around the work, keeps no state.
#include <omp.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "array.h"
#include "bind.h"
#include "coords/layout.h"
#include "coords/sort.h"
#include "kmap/kmap.h"

namespace ps {
namespace {

constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
constexpr size_t kHugePage = size_t(2) << 20;

// A 1-D output array; large ones on 2 MiB-aligned memory advised for huge
// pages (the pair arrays are written once, page faults dominate otherwise).
template <typename T>
py::array_t<T> output_array(int64_t n) {
  const size_t bytes = std::max<size_t>(1, size_t(n) * sizeof(T));
  void* p = nullptr;
  if (bytes >= kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, rounded);
#ifdef __linux__
    if (p) madvise(p, rounded, MADV_HUGEPAGE);
#endif
  } else {
    p = std::malloc(bytes);
  }
  if (!p) throw std::bad_alloc();
  py::capsule owner(p, [](void* q) { std::free(q); });
  return py::array_t<T>({py::ssize_t(n)}, {py::ssize_t(sizeof(T))}, static_cast<T*>(p), owner);
}

// Shape and row-count checks; the bounds of the rows (ValueError naming the
// first row with a negative batch).
Bounds check_coords_array(const carray<int32_t>& c, const char* name, int nt) {
  check_2d(c, 4, name);
  const int64_t n = c.shape(0);
  if (n > kMaxRows)
    value_error(std::string(name) + " has " + std::to_string(n) + " rows; kernel maps take at most " +
                std::to_string(kMaxRows));
  py::gil_scoped_release release;
  return checked_bounds(c.data(), n, name, nt);
}

// The most |offset| per axis: the margin a layout leaves for shifted keys.
std::vector<int64_t> offset_reach(const int32_t* offsets, int64_t k) {
  std::vector<int64_t> reach(3, 0);
  for (int64_t o = 0; o < k; ++o)
    for (int a = 0; a < 3; ++a) reach[a] = std::max(reach[a], std::abs(int64_t(offsets[3 * o + a])));
  return reach;
}

// (in_idx (P,) int64, out_idx (P,) int64, sizes (K,) int64). out_coords None:
// submanifold (outputs are the inputs, mirrored offsets derived). Keys use
// one layout fitted to both coords sets, with room for the offsets.
template <typename Finder>
py::tuple build_map(Finder finder, carray<int32_t> in_coords, py::object out_obj,
                    carray<int32_t> offsets, int num_threads) {
  const int nt = threads(num_threads);
  Bounds bounds = check_coords_array(in_coords, "in_coords", nt);
  carray<int32_t> out_coords;
  const int32_t* out_ptr = nullptr;
  int64_t m = in_coords.shape(0);
  if (!out_obj.is_none()) {
    out_coords = out_obj.cast<carray<int32_t>>();
    bounds.merge(check_coords_array(out_coords, "out_coords", nt));
    out_ptr = out_coords.data();
    m = out_coords.shape(0);
  }
  check_2d(offsets, 3, "offsets");
  const int64_t k = offsets.shape(0);
  if (k < 1 || k > kmap::kMaxKernelVolume)
    value_error("offsets must hold 1 to " + std::to_string(kmap::kMaxKernelVolume) + " offsets; got shape " +
                shape_str(offsets));
  const int64_t n = in_coords.shape(0);
  const int32_t* in_ptr = in_coords.data();
  const int32_t* off_ptr = offsets.data();
  const KeyLayout layout = fit_layout(bounds, offset_reach(off_ptr, k).data());

  kmap::Found found;
  std::vector<int64_t> counts, ptr(k + 1, 0);
  {
    py::gil_scoped_release release;
    found = finder(in_ptr, n, out_ptr, m, off_ptr, k, layout, nt);
    if (found.duplicate_row < 0) counts = kmap::pair_counts(found, k);
  }
  if (found.duplicate_row >= 0)
    value_error("in_coords hold duplicate rows; each [batch, x, y, z] must appear once");
  for (int64_t o = 0; o < k; ++o) ptr[o + 1] = ptr[o] + counts[o];
  auto in_idx = output_array<int64_t>(ptr[k]);
  auto out_idx = output_array<int64_t>(ptr[k]);
  auto sizes = empty_array<int64_t>({k});
  std::copy(counts.begin(), counts.end(), sizes.mutable_data());
  int64_t* in_out = in_idx.mutable_data();
  int64_t* out_out = out_idx.mutable_data();
  {
    py::gil_scoped_release release;
    kmap::assemble(found, k, m, ptr, in_out, out_out, nt);
  }
  return py::make_tuple(in_idx, out_idx, sizes);
}

py::tuple kmap_hash(carray<int32_t> in_coords, py::object out_coords, carray<int32_t> offsets,
                    int num_threads) {
  return build_map(kmap::find_hash, in_coords, out_coords, offsets, num_threads);
}

py::tuple kmap_mergesort(carray<int32_t> in_coords, py::object out_coords, carray<int32_t> offsets,
                         int num_threads) {
  return build_map(kmap::find_mergesort, in_coords, out_coords, offsets, num_threads);
}

// The first row whose downsampled coordinate leaves int32, or -1.
int64_t first_unrepresentable(const int32_t* c, int64_t n, const std::vector<int64_t>& stride) {
  for (int64_t i = 0; i < n; ++i)
    for (int a = 0; a < 3; ++a)
      if (!coord_in_range(floor_div(c[4 * i + a + 1], stride[a]) * stride[a])) return i;
  return -1;
}

// The layout holding every row of coords downsampled to `stride` (checked:
// ValueError on a bad stride or a downsampled row below int32).
KeyLayout downsampled_layout(const carray<int32_t>& coords, const std::vector<int64_t>& stride, int nt) {
  Bounds bounds = check_coords_array(coords, "coords", nt);
  if (stride.size() != 3) value_error("stride must have 3 entries; got " + std::to_string(stride.size()));
  for (int64_t s : stride)
    if (s < 1 || s > kCoordMax) value_error("stride must be in [1, " + std::to_string(kCoordMax) + "] per axis");
  const int64_t n = coords.shape(0);
  const int32_t* c = coords.data();
  // floor(c / s) * s is monotone in c: the bounds of the outputs are those of the inputs, downsampled.
  for (int a = 0; a < 3 && n > 0; ++a) {
    bounds.lo[a + 1] = floor_div(bounds.lo[a + 1], stride[a]) * stride[a];
    bounds.hi[a + 1] = floor_div(bounds.hi[a + 1], stride[a]) * stride[a];
  }
  if (n > 0 && !coord_in_range(bounds.lo[1]) + !coord_in_range(bounds.lo[2]) + !coord_in_range(bounds.lo[3])) {
    const int64_t bad = first_unrepresentable(c, n, stride);
    value_error("coords row " + std::to_string(bad) + " = " + row_str(c + 4 * bad) + " downsampled to stride (" +
                std::to_string(stride[0]) + ", " + std::to_string(stride[1]) + ", " + std::to_string(stride[2]) +
                ") falls below the int32 range of coordinates (floor(c / stride) * stride < " +
                std::to_string(kCoordMin) + ")");
  }
  const int64_t none[3] = {0, 0, 0};
  return fit_layout(bounds, none);
}

py::array_t<int32_t> kmap_downsample(carray<int32_t> coords, std::vector<int64_t> stride, int num_threads) {
  const int nt = threads(num_threads);
  const KeyLayout layout = downsampled_layout(coords, stride, nt);
  const int64_t n = coords.shape(0);
  const int32_t* c = coords.data();
  std::vector<int64_t> keys;
  {
    py::gil_scoped_release release;
    kmap::downsample_keys(c, n, stride.data(), layout, keys, nt);
  }
  const int64_t m = int64_t(keys.size());
  auto out = empty_array<int32_t>({m, 4});
  int32_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
    for (int64_t i = 0; i < m; ++i) layout.unpack(keys[i], o + 4 * i);
  }
  return out;
}

// The map of a strided conv whose kernel tiles its stride: offsets
// {0, s, ..., (t - 1) s} per axis (t = out_stride / s; every kernel index
// once), so every input lies in exactly one output's window. The outputs
// are kmap_downsample's (unique floor(c / out_stride) * out_stride, sorted
// by key) and the pairs need no search: one sort of the inputs by their
// window, then a counting pass by offset, in window order (so within an
// offset by out_idx, as the searched maps). (out_coords, in_idx, out_idx,
// sizes), the same as kmap_downsample then kmap_mergesort give; a row off
// the grid of `step` (which a searched map leaves without a pair, and whose
// duplicates no cell would show) is a ValueError.
py::tuple kmap_window(carray<int32_t> coords, std::vector<int64_t> out_stride, carray<int32_t> offsets,
                      std::vector<int64_t> step, int num_threads) {
  const int nt = threads(num_threads);
  const KeyLayout layout = downsampled_layout(coords, out_stride, nt);
  check_2d(offsets, 3, "offsets");
  if (step.size() != 3) value_error("step must have 3 entries; got " + std::to_string(step.size()));
  int64_t t[3];
  for (int a = 0; a < 3; ++a) {
    if (step[a] < 1 || out_stride[a] % step[a] != 0)
      value_error("step must divide out_stride on every axis, each at least 1");
    t[a] = out_stride[a] / step[a];
  }
  const int64_t k = offsets.shape(0);
  int64_t cells = 1;  // the window's cells, at most kMaxKernelVolume (checked per factor: no overflow)
  for (int a = 0; a < 3; ++a) cells = t[a] > kmap::kMaxKernelVolume ? kmap::kMaxKernelVolume + 1
                                                                    : std::min(cells * t[a], kmap::kMaxKernelVolume + 1);
  if (k < 1 || k != cells || k > kmap::kMaxKernelVolume)
    value_error("offsets must hold one offset per cell of the stride's window (" + std::to_string(cells) +
                "); got shape " + shape_str(offsets));
  std::vector<int32_t> slot(size_t(k), -1);  // window cell -> offset row
  const int32_t* off = offsets.data();
  for (int64_t o = 0; o < k; ++o) {
    int64_t cell = 0;
    for (int a = 0; a < 3; ++a) {
      const int64_t v = off[3 * o + a];
      if (v < 0 || v % step[a] != 0 || v / step[a] >= t[a])
        value_error("offsets must be multiples of step in [0, out_stride) on every axis");
      cell = cell * t[a] + v / step[a];
    }
    if (slot[size_t(cell)] >= 0) value_error("offsets must cover the stride's window once");
    slot[size_t(cell)] = int32_t(o);
  }
  const int64_t n = coords.shape(0);
  const int32_t* c = coords.data();
  std::vector<int64_t> sizes_v(size_t(k), 0), ptr(size_t(k) + 1, 0), out_keys;
  std::vector<int64_t> sorted(static_cast<size_t>(n)), perm(static_cast<size_t>(n));
  std::vector<int32_t> cell_of(static_cast<size_t>(n));
  int64_t duplicate = -1, off_grid = -1;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> keys(static_cast<size_t>(n));
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* r = c + 4 * i;
      int64_t q[3], cell = 0;
      bool on_grid = true;  // a row off the step's grid: refused below
      for (int a = 0; a < 3; ++a) {
        q[a] = floor_div(r[a + 1], out_stride[a]) * out_stride[a];
        on_grid &= (r[a + 1] - q[a]) % step[a] == 0;
        cell = cell * t[a] + (r[a + 1] - q[a]) / step[a];
      }
      keys[size_t(i)] = layout.pack(r[0], q[0], q[1], q[2]);
      cell_of[size_t(i)] = on_grid ? int32_t(cell) : -1;
    }
    radix_sort_keys(keys.data(), n, sorted.data(), perm.data(), nt);
    // Windows in key order; a cell met twice in one window is a duplicate input row.
    std::vector<int64_t> seen(size_t(k), -1);
    out_keys.reserve(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      if (i == 0 || sorted[size_t(i)] != sorted[size_t(i - 1)]) out_keys.push_back(sorted[size_t(i)]);
      const int64_t w = int64_t(out_keys.size()) - 1;
      const int32_t cell = cell_of[size_t(perm[size_t(i)])];
      if (cell < 0) {  // no cell holds it, and a duplicate of it could not be seen: refused
        if (off_grid < 0 || perm[size_t(i)] < off_grid) off_grid = perm[size_t(i)];
        continue;
      }
      if (seen[size_t(cell)] == w && duplicate < 0) duplicate = perm[size_t(i)];
      seen[size_t(cell)] = w;
      ++sizes_v[size_t(slot[size_t(cell)])];
    }
  }
  if (off_grid >= 0)
    value_error("coords row " + std::to_string(off_grid) + " = " + row_str(c + 4 * off_grid) +
                " is not on the grid of step (" + std::to_string(step[0]) + ", " + std::to_string(step[1]) + ", " +
                std::to_string(step[2]) + "): coords of a tensor must be multiples of its stride");
  if (duplicate >= 0) value_error("in_coords hold duplicate rows; each [batch, x, y, z] must appear once");
  for (int64_t o = 0; o < k; ++o) ptr[size_t(o + 1)] = ptr[size_t(o)] + sizes_v[size_t(o)];
  const int64_t m = int64_t(out_keys.size());
  auto out = empty_array<int32_t>({m, 4});
  auto in_idx = output_array<int64_t>(ptr[size_t(k)]);
  auto out_idx = output_array<int64_t>(ptr[size_t(k)]);
  auto sizes = empty_array<int64_t>({k});
  std::copy(sizes_v.begin(), sizes_v.end(), sizes.mutable_data());
  int32_t* o_c = out.mutable_data();
  int64_t* in_o = in_idx.mutable_data();
  int64_t* out_o = out_idx.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
    for (int64_t i = 0; i < m; ++i) layout.unpack(out_keys[size_t(i)], o_c + 4 * i);
    int64_t w = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (i == 0 || sorted[size_t(i)] != sorted[size_t(i - 1)]) ++w;
      const int64_t p = perm[size_t(i)];
      if (cell_of[size_t(p)] < 0) continue;
      const int64_t at = ptr[size_t(slot[size_t(cell_of[size_t(p)])])]++;
      in_o[at] = p;
      out_o[at] = w;
    }
  }
  return py::make_tuple(out, in_idx, out_idx, sizes);
}

}  // namespace

void bind_kmap(py::module_& m) {
  m.attr("MAX_KERNEL_VOLUME") = kmap::kMaxKernelVolume;
  m.def("kmap_hash", &kmap_hash, py::arg("in_coords"), py::arg("out_coords"), py::arg("offsets"),
        py::arg("num_threads"),
        "Kernel map by an open-addressing hash table: (in_idx, out_idx, sizes), grouped by offset, "
        "sorted by out_idx within an offset. out_coords None: submanifold.");
  m.def("kmap_mergesort", &kmap_mergesort, py::arg("in_coords"), py::arg("out_coords"), py::arg("offsets"),
        py::arg("num_threads"),
        "Kernel map by merging sorted keys: same result as kmap_hash.");
  m.def("kmap_downsample", &kmap_downsample, py::arg("coords"), py::arg("stride"), py::arg("num_threads"),
        "Unique floor(c / stride) * stride rows per batch, sorted by (batch, x, y, z).");
  m.def("kmap_window", &kmap_window, py::arg("coords"), py::arg("out_stride"), py::arg("offsets"),
        py::arg("step"), py::arg("num_threads"),
        "The map of a strided conv whose kernel offsets tile the stride's window (multiples of step in "
        "[0, out_stride)): (out_coords, in_idx, out_idx, sizes), as kmap_downsample then kmap_mergesort.");
}

}  // namespace ps
