// Voxelisation: quantise points to exact keys, reduce per-voxel features,
// and find the trilinear neighbours of points among active voxels.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "array.h"
#include "bind.h"
#include "coords/layout.h"

namespace ps {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// Pass 1: the first unrepresentable row (non-finite, outside int32, or a
// batch outside [0, kBatchMax]) and the bounds of the voxels.
template <typename F>
int64_t quantize_bounds(const F* p, const int64_t* batch, int64_t n, const double* vs, Bounds& out, int nt) {
  int64_t bad = kNone;
  int64_t lb = 0, lx = kNone, ly = kNone, lz = kNone;
  int64_t hb = 0, hx = -kNone, hy = -kNone, hz = -kNone;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad, lx, ly, lz) \
    reduction(max : hb, hx, hy, hz)
  for (int64_t i = 0; i < n; ++i) {
    bool ok = batch == nullptr || (batch[i] >= 0 && batch[i] <= kBatchMax);
    int64_t q[3] = {0, 0, 0};
    for (int a = 0; a < 3 && ok; ++a) {
      const double v = std::floor(double(p[3 * i + a]) / vs[a]);
      ok = std::isfinite(v) && v >= double(kCoordMin) && v <= double(kCoordMax);
      q[a] = ok ? int64_t(v) : 0;
    }
    if (!ok) {
      bad = std::min(bad, i);
      continue;
    }
    hb = std::max(hb, batch ? batch[i] : 0);
    lx = std::min(lx, q[0]), hx = std::max(hx, q[0]);
    ly = std::min(ly, q[1]), hy = std::max(hy, q[1]);
    lz = std::min(lz, q[2]), hz = std::max(hz, q[2]);
  }
  if (n > 0) {
    const int64_t l[4] = {lb, lx, ly, lz}, h[4] = {hb, hx, hy, hz};
    std::copy(l, l + 4, out.lo);
    std::copy(h, h + 4, out.hi);
  }
  return bad == kNone ? -1 : bad;
}

// Pass 2: the keys of the voxels.
template <typename F>
void quantize_keys(const F* p, const int64_t* batch, int64_t n, const double* vs, const KeyLayout& layout,
                   int64_t* keys, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t i = 0; i < n; ++i) {
    int64_t q[3];
    for (int a = 0; a < 3; ++a) q[a] = int64_t(std::floor(double(p[3 * i + a]) / vs[a]));
    keys[i] = layout.pack(batch ? batch[i] : 0, q[0], q[1], q[2]);
  }
}

std::vector<double> voxel_size_vec(const std::vector<double>& voxel_size) {
  if (voxel_size.size() != 3) value_error("voxel_size must have 3 entries");
  for (double v : voxel_size)
    if (!(v > 0) || !std::isfinite(v)) value_error("voxel_size must be positive and finite");
  return voxel_size;
}

// (keys (N,), layout): keys of [batch, floor(points / voxel_size)] in a
// layout fitted to them.
py::tuple quantize(py::array points, std::vector<double> voxel_size, py::object batch_obj, int num_threads) {
  check_2d(points, 3, "points");
  const auto vs = voxel_size_vec(voxel_size);
  const int64_t n = points.shape(0);
  const int nt = threads(num_threads, n);
  carray<int64_t> batch;
  const int64_t* b = nullptr;
  if (!batch_obj.is_none()) {
    batch = as_carray<int64_t>(batch_obj, "batch");
    check_1d(batch, n, "batch");
    b = batch.data();
  }
  const bool single = points.dtype().is(py::dtype::of<float>());
  carray<float> p32;
  carray<double> p64;
  if (single)
    p32 = as_carray<float>(points, "points");
  else
    p64 = as_carray<double>(points, "points");
  Bounds bounds;
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = single ? quantize_bounds(p32.data(), b, n, vs.data(), bounds, nt)
                 : quantize_bounds(p64.data(), b, n, vs.data(), bounds, nt);
  }
  if (bad >= 0 && b != nullptr && (b[bad] < 0 || b[bad] > kBatchMax))
    value_error("batch[" + std::to_string(bad) + "] = " + std::to_string(b[bad]) + " is outside [0, " +
                std::to_string(kBatchMax) + "]");
  if (bad >= 0)
    value_error("points row " + std::to_string(bad) +
                " cannot be voxelised: coordinates must be finite and points / voxel_size must "
                "lie in the int32 range [" + std::to_string(kCoordMin) + ", " + std::to_string(kCoordMax) +
                "] (shift the cloud or use a larger voxel_size)");
  const int64_t none[3] = {0, 0, 0};
  const KeyLayout layout = fit_layout(bounds, none);
  auto keys = empty_array<int64_t>({n});
  int64_t* k = keys.mutable_data();
  {
    py::gil_scoped_release release;
    if (single)
      quantize_keys(p32.data(), b, n, vs.data(), layout, k, nt);
    else
      quantize_keys(p64.data(), b, n, vs.data(), layout, k, nt);
  }
  return py::make_tuple(keys, layout_fields(layout));
}

// mode: 0 sum, 1 mean, 2 max, 3 first. arg (M, C) holds the source row of each
// max (the first NaN row where a voxel holds NaN: max propagates NaN), (M,)
// the first row of each segment; empty for sum and mean.
template <typename F>
void reduce_impl(const F* x, int64_t c, const int64_t* perm, const int64_t* seg, int64_t m,
                 int mode, F* out, int64_t* arg, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 256)
  for (int64_t j = 0; j < m; ++j) {
    F* o = out + j * c;
    const int64_t lo = seg[j], hi = seg[j + 1];
    if (mode == 3) {
      const F* src = x + perm[lo] * c;
      std::copy(src, src + c, o);
      arg[j] = perm[lo];
      continue;
    }
    if (mode == 2) {
      int64_t* a = arg + j * c;
      const F* src = x + perm[lo] * c;
      for (int64_t k = 0; k < c; ++k) o[k] = src[k], a[k] = perm[lo];
      // NaN propagates (as torch.amax): the first NaN row of a voxel wins
      // and stays; otherwise the first row holding the maximum.
      for (int64_t i = lo + 1; i < hi; ++i) {
        const F* s = x + perm[i] * c;
        for (int64_t k = 0; k < c; ++k)
          if (s[k] > o[k] || (s[k] != s[k] && o[k] == o[k])) o[k] = s[k], a[k] = perm[i];
      }
      continue;
    }
    std::fill(o, o + c, F(0));
    for (int64_t i = lo; i < hi; ++i) {
      const F* s = x + perm[i] * c;
      for (int64_t k = 0; k < c; ++k) o[k] += s[k];
    }
    if (mode == 1) {
      const F count = F(hi - lo);
      for (int64_t k = 0; k < c; ++k) o[k] /= count;
    }
  }
}

py::tuple segment_reduce(py::array feats, carray<int64_t> perm, carray<int64_t> seg_ptr,
                         int mode, int num_threads) {
  check_2d(feats, -1, "feats");
  const int64_t n = feats.shape(0), c = feats.shape(1);
  check_1d(perm, n, "perm");
  if (seg_ptr.ndim() != 1 || seg_ptr.shape(0) < 1) value_error("seg_ptr must be 1-D, non-empty");
  if (mode < 0 || mode > 3) value_error("mode must be 0 (sum), 1 (mean), 2 (max) or 3 (first)");
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
  py::array_t<int64_t> arg = mode == 2 ? empty_array<int64_t>({m, c})
                             : mode == 3 ? empty_array<int64_t>({m})
                                         : empty_array<int64_t>({0});
  if (feats.dtype().is(py::dtype::of<float>())) {
    auto x = as_carray<float>(feats, "feats");
    auto out = empty_array<float>({m, c});
    float* o = out.mutable_data();
    int64_t* a = arg.mutable_data();
    {
      py::gil_scoped_release release;
      reduce_impl(x.data(), c, p, s, m, mode, o, a, nt);
    }
    return py::make_tuple(out, arg);
  }
  if (!feats.dtype().is(py::dtype::of<double>())) value_error("feats must be float32 or float64");
  auto x = as_carray<double>(feats, "feats");
  auto out = empty_array<double>({m, c});
  double* o = out.mutable_data();
  int64_t* a = arg.mutable_data();
  {
    py::gil_scoped_release release;
    reduce_impl(x.data(), c, p, s, m, mode, o, a, nt);
  }
  return py::make_tuple(out, arg);
}

// For each point, the rows of the 8 voxels around it (-1 where inactive) and
// normalised trilinear weights over the active ones. Voxel coordinates are
// multiples of `stride`; a voxel c spans [c, c + stride) * voxel_size and its
// centre is (c + stride / 2) * voxel_size. sorted_keys/sorted_rows: the voxel
// keys ascending and the row of each.
template <typename F>
void trilinear_impl(const F* p, const int64_t* batch, int64_t n, const double* vs,
                    const int64_t* st, const KeyLayout& layout, const int64_t* keys, const int64_t* rows,
                    int64_t m, int64_t* idx, F* w, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double base[3], frac[3];
    for (int a = 0; a < 3; ++a) {
      const double u = double(p[3 * i + a]) / (vs[a] * double(st[a])) - 0.5;
      base[a] = std::floor(u);
      frac[a] = u - base[a];
    }
    // Weights in double: each is rounded to F once, after renormalising.
    double weights[8];
    double total = 0;
    for (int corner = 0; corner < 8; ++corner) {
      int64_t q[3];
      double weight = 1;
      const int64_t b = batch ? batch[i] : 0;
      bool ok = b <= layout.field_max(0);  // other batches hold no voxel
      for (int a = 0; a < 3; ++a) {
        const int bit = (corner >> (2 - a)) & 1;
        // Check the corner against the layout as a double before any integer
        // cast (exact: the bounds are below 2^53); outside it no voxel is active.
        const double qd = (base[a] + bit) * double(st[a]);
        ok = ok && qd >= double(layout.origin[a]) && qd <= double(layout.origin[a] + layout.field_max(a + 1));
        q[a] = ok ? int64_t(qd) : 0;
        weight *= bit ? frac[a] : 1 - frac[a];
      }
      int64_t row = -1;
      if (ok) {
        const int64_t key = layout.pack(b, q[0], q[1], q[2]);
        const int64_t* hit = std::lower_bound(keys, keys + m, key);
        if (hit != keys + m && *hit == key) row = rows[hit - keys];
      }
      idx[8 * i + corner] = row;
      weights[corner] = row >= 0 ? weight : 0.0;
      total += weights[corner];
    }
    for (int corner = 0; corner < 8; ++corner)
      w[8 * i + corner] = total > 0 ? F(weights[corner] / total) : F(0);
  }
}

py::tuple trilinear_neighbors(py::array points, py::object batch_obj,
                              std::vector<double> voxel_size, std::vector<int64_t> stride,
                              std::vector<int64_t> layout_in, carray<int64_t> sorted_keys,
                              carray<int64_t> sorted_rows, int64_t num_voxels, int num_threads) {
  check_2d(points, 3, "points");
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
  carray<int64_t> batch;
  const int64_t* b = nullptr;
  if (!batch_obj.is_none()) {
    batch = as_carray<int64_t>(batch_obj, "batch");
    check_1d(batch, n, "batch");
    b = batch.data();
    for (int64_t i = 0; i < n; ++i)
      if (b[i] < 0 || b[i] > kBatchMax) value_error("batch index out of range at point " + std::to_string(i));
  }
  const int nt = threads(num_threads, 8 * n);
  auto idx = empty_array<int64_t>({n, 8});
  if (points.dtype().is(py::dtype::of<float>())) {
    auto p = as_carray<float>(points, "points");
    auto w = empty_array<float>({n, 8});
    float* wp = w.mutable_data();
    int64_t* ip = idx.mutable_data();
    {
      py::gil_scoped_release release;
      trilinear_impl(p.data(), b, n, vs.data(), stride.data(), layout, sorted_keys.data(), r, m, ip, wp, nt);
    }
    return py::make_tuple(idx, w);
  }
  auto p = as_carray<double>(points, "points");
  auto w = empty_array<double>({n, 8});
  double* wp = w.mutable_data();
  int64_t* ip = idx.mutable_data();
  {
    py::gil_scoped_release release;
    trilinear_impl(p.data(), b, n, vs.data(), stride.data(), layout, sorted_keys.data(), r, m, ip, wp, nt);
  }
  return py::make_tuple(idx, w);
}

}  // namespace

void bind_voxelize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("points"), py::arg("voxel_size"), py::arg("batch"),
        py::arg("num_threads"),
        "(keys, layout) of [batch, floor(points / voxel_size)], the layout fitted to them; ValueError on bad rows.");
  m.def("segment_reduce", &segment_reduce, py::arg("feats"), py::arg("perm"), py::arg("seg_ptr"),
        py::arg("mode"), py::arg("num_threads"),
        "Reduce rows perm[seg_ptr[j]:seg_ptr[j+1]] of feats: mode 0 sum, 1 mean, 2 max, 3 first.");
  m.def("trilinear_neighbors", &trilinear_neighbors, py::arg("points"), py::arg("batch"),
        py::arg("voxel_size"), py::arg("stride"), py::arg("layout"), py::arg("sorted_keys"), py::arg("sorted_rows"),
        py::arg("num_voxels"), py::arg("num_threads"),
        "(idx (N, 8), weights (N, 8)) of the 8 voxels around each point; -1 where inactive.");
}

}  // namespace ps
