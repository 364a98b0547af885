// Voxelisation bindings: shapes, dtypes, indices and voxel sizes checked
// here before anything is allocated or any parallel region runs; then the
// GIL is released and the kernels of voxelize.h run.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "array.h"
#include "bind.h"
#include "voxelize/voxelize.h"

namespace ps {
namespace {

std::vector<double> voxel_size_vec(const std::vector<double>& voxel_size) {
  if (voxel_size.size() != 3) value_error("voxel_size must have 3 entries");
  for (double v : voxel_size)
    if (!(v > 0) || !std::isfinite(v)) value_error("voxel_size must be positive and finite");
  return voxel_size;
}

// The optional (n,) int64 batch column; data null for None.
struct BatchArg {
  carray<int64_t> array;
  const int64_t* data = nullptr;
};

BatchArg batch_arg(const py::object& batch, int64_t n) {
  BatchArg out;
  if (batch.is_none()) return out;
  out.array = as_carray<int64_t>(batch, "batch");
  check_1d(out.array, n, "batch");
  out.data = out.array.data();
  return out;
}

// Points as float32 when they are, else as float64 (one copy at most).
py::array points_arg(const py::array& points) {
  check_2d(points, 3, "points");
  if (points.dtype().is(py::dtype::of<float>())) return as_carray<float>(points, "points");
  return as_carray<double>(points, "points");
}

void check_mode(int mode) {
  if (mode < voxelize::kSum || mode > voxelize::kFirst)
    value_error("mode must be 0 (sum), 1 (mean), 2 (max) or 3 (first)");
}

// arg of a reduction: (m, c) for max, (m,) for first, empty otherwise (and
// where the caller needs none: no gradient to route).
py::array_t<int64_t> reduce_arg(int mode, int64_t m, int64_t c, bool wanted = true) {
  return !wanted ? empty_array<int64_t>({0})
         : mode == voxelize::kMax ? empty_array<int64_t>({m, c})
         : mode == voxelize::kFirst ? empty_array<int64_t>({m})
                                    : empty_array<int64_t>({0});
}

// (keys (N,), layout): keys of [batch, floor(points / voxel_size)] in a
// layout fitted to them.
py::tuple quantize(py::array points, std::vector<double> voxel_size, py::object batch_obj, int num_threads) {
  points = points_arg(points);
  const auto vs = voxel_size_vec(voxel_size);
  const int64_t n = points.shape(0);
  const int nt = stream_threads(num_threads, n);
  const auto batch = batch_arg(batch_obj, n);
  const int64_t* b = batch.data;
  auto keys = empty_array<int64_t>({n});
  int64_t* k = keys.mutable_data();
  KeyLayout layout;
  std::unique_ptr<int32_t[]> q(new int32_t[static_cast<std::size_t>(3 * n)]);
  dispatch_float(points, "points", [&](auto zero) {
    using F = decltype(zero);
    const F* p = static_cast<const F*>(points.data());
    py::gil_scoped_release release;
    Bounds bounds;
    voxelize::check_quantized(voxelize::quantize_bounds(p, b, n, vs.data(), bounds, q.get(), nt), b);
    const int64_t none[3] = {0, 0, 0};
    layout = fit_layout(bounds, none);
    voxelize::quantize_keys(q.get(), b, n, layout, k, nt);
  });
  return py::make_tuple(keys, layout_fields(layout));
}

py::tuple segment_reduce(py::array feats, carray<int64_t> perm, carray<int64_t> seg_ptr,
                         int mode, int num_threads) {
  check_2d(feats, -1, "feats");
  const int64_t n = feats.shape(0), c = feats.shape(1);
  check_1d(perm, n, "perm");
  if (seg_ptr.ndim() != 1 || seg_ptr.shape(0) < 1) value_error("seg_ptr must be 1-D, non-empty");
  check_mode(mode);
  const int64_t m = seg_ptr.shape(0) - 1;
  const int64_t* s = seg_ptr.data();
  const int64_t* p = perm.data();
  // Bounds before any parallel region: segments tile [0, n), rows in range.
  if (s[0] != 0 || s[m] != n) value_error("seg_ptr must start at 0 and end at len(perm)");
  for (int64_t j = 0; j < m; ++j)
    if (s[j + 1] <= s[j]) value_error("seg_ptr must be strictly increasing");
  for (int64_t i = 0; i < n; ++i)
    if (p[i] < 0 || p[i] >= n) value_error("perm holds a row outside [0, len(feats))");
  const int nt = threads(num_threads, n * std::max<int64_t>(c, 1));
  return dispatch_float(feats, "feats", [&](auto zero) -> py::tuple {
    using F = decltype(zero);
    auto x = as_carray<F>(feats, "feats");
    auto out = empty_array<F>({m, c});
    auto arg = reduce_arg(mode, m, c);
    F* o = out.mutable_data();
    int64_t* a = arg.mutable_data();
    {
      py::gil_scoped_release release;
      voxelize::reduce(x.data(), c, p, s, m, mode, o, a, nt);
    }
    return py::make_tuple(out, arg);
  });
}

// The whole of pointsparse.voxelize in one call: (coords (M, 4) int32,
// inverse (N,), perm (N,), seg_ptr (M + 1,), feats (M, C), arg).
py::tuple voxelize_points(py::array points, py::array feats, std::vector<double> voxel_size, py::object batch_obj,
                          int mode, int num_threads, bool with_arg) {
  points = points_arg(points);
  const int64_t n = points.shape(0);
  check_2d(feats, -1, "feats");
  if (feats.shape(0) != n)
    value_error("feats must have one row per point: (" + std::to_string(n) + ", C); got shape " + shape_str(feats));
  const auto vs = voxel_size_vec(voxel_size);
  check_mode(mode);
  const auto batch = batch_arg(batch_obj, n);
  const int64_t* b = batch.data;
  const int64_t c = feats.shape(1);
  return dispatch_float(feats, "feats", [&](auto zero) -> py::tuple {
    using F = decltype(zero);
    const auto x = as_carray<F>(feats, "feats");
    auto perm = empty_array<int64_t>({n});
    auto inverse = empty_array<int64_t>({n});
    int64_t* pm = perm.mutable_data();
    voxelize::Voxels voxels = dispatch_float(points, "points", [&](auto pzero) {
      using P = decltype(pzero);
      const P* p = static_cast<const P*>(points.data());
      py::gil_scoped_release release;
      return voxelize::group_points(p, b, n, vs.data(), pm, inverse.mutable_data(), num_threads);
    });
    const int64_t m = voxels.count();
    auto coords = empty_array<int32_t>({m, 4});
    auto seg = empty_array<int64_t>({m + 1});
    auto out = empty_array<F>({m, c});
    auto arg = reduce_arg(mode, m, c, with_arg);
    {
      py::gil_scoped_release release;
      voxelize::voxel_coords(voxels, coords.mutable_data(), seg.mutable_data(), stream_threads(num_threads, m));
      voxelize::reduce(x.data(), c, pm, seg.data(), m, mode, out.mutable_data(), with_arg ? arg.mutable_data() : nullptr,
                       threads(num_threads, n * std::max<int64_t>(c, 1)));
    }
    return py::make_tuple(coords, inverse, perm, seg, out, arg);
  });
}

// For each point, the rows of the 8 voxels around it (-1 where inactive) and
// normalised trilinear weights over the active ones (voxelize.h).
py::tuple trilinear_neighbors(py::array points, py::object batch_obj,
                              std::vector<double> voxel_size, std::vector<int64_t> stride,
                              std::vector<int64_t> layout_in, carray<int64_t> sorted_keys,
                              carray<int64_t> sorted_rows, int64_t num_voxels, int num_threads) {
  points = points_arg(points);
  const auto vs = voxel_size_vec(voxel_size);
  const KeyLayout layout = layout_from(layout_in);
  if (stride.size() != 3) value_error("stride must have 3 entries");
  for (auto s : stride)
    if (s < 1) value_error("stride must be positive");
  const int64_t n = points.shape(0);
  check_1d(sorted_keys, -1, "sorted_keys");
  const int64_t m = sorted_keys.shape(0);
  check_1d(sorted_rows, m, "sorted_rows");
  const int64_t* r = sorted_rows.data();
  for (int64_t j = 0; j < m; ++j)
    if (r[j] < 0 || r[j] >= num_voxels) value_error("sorted_rows holds a row outside the tensor");
  // The kernel finds each corner's key by binary search: unsorted keys miss voxels silently.
  const int64_t* keys = sorted_keys.data();
  for (int64_t j = 1; j < m; ++j)
    if (keys[j] < keys[j - 1])
      value_error("sorted_keys must be ascending; sorted_keys[" + std::to_string(j) + "] = " +
                  std::to_string(keys[j]) + " < sorted_keys[" + std::to_string(j - 1) + "] = " +
                  std::to_string(keys[j - 1]));
  const auto batch = batch_arg(batch_obj, n);
  const int64_t* b = batch.data;
  for (int64_t i = 0; b && i < n; ++i)
    if (b[i] < 0 || b[i] > kBatchMax) value_error("batch index out of range at point " + std::to_string(i));
  const int nt = threads(num_threads, 8 * n);
  return dispatch_float(points, "points", [&](auto zero) -> py::tuple {
    using F = decltype(zero);
    auto idx = empty_array<int64_t>({n, 8});
    auto w = empty_array<F>({n, 8});
    const F* p = static_cast<const F*>(points.data());
    int64_t* ip = idx.mutable_data();
    F* wp = w.mutable_data();
    {
      py::gil_scoped_release release;
      voxelize::trilinear(p, b, n, vs.data(), stride.data(), layout, keys, r, m, ip, wp, nt);
    }
    return py::make_tuple(idx, w);
  });
}

}  // namespace

void bind_voxelize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("points"), py::arg("voxel_size"), py::arg("batch"),
        py::arg("num_threads"),
        "(keys, layout) of [batch, floor(points / voxel_size)], the layout fitted to them; ValueError on bad rows.");
  m.def("segment_reduce", &segment_reduce, py::arg("feats"), py::arg("perm"), py::arg("seg_ptr"),
        py::arg("mode"), py::arg("num_threads"),
        "Reduce rows perm[seg_ptr[j]:seg_ptr[j+1]] of feats: mode 0 sum, 1 mean, 2 max, 3 first.");
  m.def("voxelize", &voxelize_points, py::arg("points"), py::arg("feats"), py::arg("voxel_size"),
        py::arg("batch"), py::arg("mode"), py::arg("num_threads"), py::arg("with_arg") = true,
        "(coords (M, 4) int32, inverse (N,), perm (N,), seg_ptr (M + 1,), feats (M, C), arg): quantise, "
        "group and reduce in one call (mode as segment_reduce; with_arg=False: arg empty, none made); ValueError "
        "naming a bad argument or row.");
  m.def("trilinear_neighbors", &trilinear_neighbors, py::arg("points"), py::arg("batch"),
        py::arg("voxel_size"), py::arg("stride"), py::arg("layout"), py::arg("sorted_keys"), py::arg("sorted_rows"),
        py::arg("num_voxels"), py::arg("num_threads"),
        "(idx (N, 8), weights (N, 8)) of the 8 voxels around each point; -1 where inactive.");
}

}  // namespace ps
