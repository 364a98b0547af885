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

#include "array.h"
#include "bind.h"
#include "coords/layout.h"
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
    out_coords = as_carray<int32_t>(out_obj, "out_coords");
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

// The checked stride of a downsampling and the layout that holds its output
// rows (ValueError for a bad stride or a row whose output leaves int32).
KeyLayout downsample_layout(const carray<int32_t>& coords, const std::vector<int64_t>& stride, int nt) {
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

// (m, 4) int32 rows of the keys.
py::array_t<int32_t> unpack_rows(const std::vector<int64_t>& keys, const KeyLayout& layout, int nt) {
  const int64_t m = int64_t(keys.size());
  auto out = empty_array<int32_t>({m, 4});
  int32_t* o = out.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t i = 0; i < m; ++i) layout.unpack(keys[i], o + 4 * i);
  return out;
}

py::array_t<int32_t> kmap_downsample(carray<int32_t> coords, std::vector<int64_t> stride, int num_threads) {
  const int nt = threads(num_threads);
  const KeyLayout layout = downsample_layout(coords, stride, nt);
  std::vector<int64_t> keys;
  {
    py::gil_scoped_release release;
    kmap::downsample_keys(coords.data(), coords.shape(0), stride.data(), layout, keys, nt);
  }
  return unpack_rows(keys, layout, nt);
}

// (out_coords, in_idx, out_idx, sizes) of a conv whose kernel tiles its
// stride (kmap::parent_pairs), or None where out_coords are given and are
// not the distinct parents (the caller builds such a map by a search).
py::object kmap_parents(carray<int32_t> coords, std::vector<int64_t> stride, std::vector<int64_t> kernel,
                        py::object out_obj, int num_threads) {
  const int nt = threads(num_threads);
  const KeyLayout layout = downsample_layout(coords, stride, nt);
  if (kernel.size() != 3) value_error("kernel must have 3 entries; got " + std::to_string(kernel.size()));
  for (int a = 0; a < 3; ++a)
    if ((kernel[a] != 1 && kernel[a] != 2) || stride[a] % kernel[a] != 0)
      value_error("kernel must be 1 or 2 per axis and divide the stride; got kernel " + std::to_string(kernel[a]) +
                  " and stride " + std::to_string(stride[a]) + " on axis " + std::to_string(a));
  carray<int32_t> given;
  if (!out_obj.is_none()) {
    given = as_carray<int32_t>(out_obj, "out_coords");
    check_2d(given, 4, "out_coords");
  }
  const int64_t n = coords.shape(0);
  auto in_idx = output_array<int64_t>(n);
  auto out_idx = output_array<int64_t>(n);
  kmap::ParentPairs found;
  {
    py::gil_scoped_release release;
    found = kmap::parent_pairs(coords.data(), n, stride.data(), kernel.data(), layout, in_idx.mutable_data(),
                               out_idx.mutable_data(), nt);
  }
  if (found.off_grid_row >= 0)
    value_error("coords row " + std::to_string(found.off_grid_row) + " = " +
                row_str(coords.data() + 4 * found.off_grid_row) +
                " is not a multiple of the tensor stride (stride / kernel)");
  if (found.duplicate_row >= 0)
    value_error("coords hold duplicate rows; each [batch, x, y, z] must appear once");
  auto out = unpack_rows(found.out_keys, layout, nt);
  if (!out_obj.is_none()) {
    const int64_t m = int64_t(found.out_keys.size());
    if (given.shape(0) != m || !std::equal(given.data(), given.data() + 4 * m, out.data())) return py::none();
  }
  const int64_t k = kernel[0] * kernel[1] * kernel[2];
  auto sizes = empty_array<int64_t>({k});
  std::copy(found.sizes.begin(), found.sizes.end(), sizes.mutable_data());
  return py::make_tuple(out, in_idx, out_idx, sizes);
}

// The pairs of a map restricted to kept output rows (kmap::count_kept /
// write_kept): (in_idx, out_idx, sizes) of the pairs whose output row
// out_new keeps, out rows renumbered, in their order. Every out_idx is
// checked against out_new's length and the sizes against the pairs before
// the work.
py::tuple kmap_restrict(carray<int64_t> in_idx, carray<int64_t> out_idx, carray<int64_t> sizes,
                        carray<int64_t> out_new, int num_threads) {
  const int nt = threads(num_threads);
  check_1d(in_idx, -1, "in_idx");
  const int64_t n = in_idx.shape(0);
  check_1d(out_idx, n, "out_idx");
  check_1d(sizes, -1, "sizes");
  check_1d(out_new, -1, "out_new");
  const int64_t k = sizes.shape(0);
  std::vector<int64_t> ptr(size_t(k + 1), 0);
  for (int64_t o = 0; o < k; ++o)
    if (sizes.data()[o] < 0) value_error("sizes must be >= 0; got " + std::to_string(sizes.data()[o]));
  // Each size is compared with the pairs left (ptr[o] <= n here), so that no
  // sum overflows: sizes wrapping back to n walked offsets past the pairs.
  for (int64_t o = 0; o < k; ++o) {
    if (sizes.data()[o] > n - ptr[o])
      value_error("sizes must sum to the pairs' " + std::to_string(n) + "; sizes[:" + std::to_string(o + 1) +
                  "] sum past it (sizes[" + std::to_string(o) + "] = " + std::to_string(sizes.data()[o]) + ")");
    ptr[o + 1] = ptr[o] + sizes.data()[o];
  }
  if (ptr[k] != n)
    value_error("sizes must sum to the pairs' " + std::to_string(n) + "; they sum to " + std::to_string(ptr[k]));
  const int64_t m = out_new.shape(0);
  const int64_t* oi = out_idx.data();
  int64_t first = n;
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : first)
    for (int64_t p = 0; p < n; ++p)
      if (oi[p] < 0 || oi[p] >= m) first = std::min(first, p);
  }
  if (first < n)
    value_error("out_idx[" + std::to_string(first) + "] = " + std::to_string(oi[first]) + " is not a row of out_new's " +
                std::to_string(m));
  auto kept = empty_array<int64_t>({k});
  {
    py::gil_scoped_release release;
    kmap::count_kept(oi, ptr.data(), k, out_new.data(), kept.mutable_data(), nt);
  }
  std::vector<int64_t> at(size_t(k + 1), 0);
  for (int64_t o = 0; o < k; ++o) at[o + 1] = at[o] + kept.data()[o];
  auto in_kept = output_array<int64_t>(at[k]);
  auto out_kept = output_array<int64_t>(at[k]);
  {
    py::gil_scoped_release release;
    kmap::write_kept(in_idx.data(), oi, ptr.data(), k, out_new.data(), at.data(), in_kept.mutable_data(),
                     out_kept.mutable_data(), nt);
  }
  return py::make_tuple(in_kept, out_kept, kept);
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
  m.def("kmap_restrict", &kmap_restrict, py::arg("in_idx"), py::arg("out_idx"), py::arg("sizes"),
        py::arg("out_new"), py::arg("num_threads"),
        "(in_idx, out_idx, sizes) of a map's pairs whose output row out_new keeps (out_new[q] >= 0: its new "
        "number, -1: dropped), out rows renumbered, in their order.");
  m.def("kmap_parents", &kmap_parents, py::arg("coords"), py::arg("stride"), py::arg("kernel"),
        py::arg("out_coords"), py::arg("num_threads"),
        "Map of a conv whose kernel (1 or 2 per axis, dilation 1) tiles its stride: (out_coords, in_idx, "
        "out_idx, sizes) as kmap_downsample then kmap_mergesort, or None when out_coords are given and are not "
        "the downsampled coords.");
}

}  // namespace ps
