// Voxelisation: quantise points to exact keys, reduce per-voxel features,
// and find the trilinear neighbours of points among active voxels.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "array.h"
#include "bind.h"

namespace ps {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

template <typename F>
int64_t quantize_impl(const F* p, const int64_t* batch, int64_t n, const double* vs, int64_t* keys,
                      int nt) {
  // Pass 1 finds the first unrepresentable row; pass 2 writes keys.
  int64_t bad = kNone;
#pragma omp parallel for num_threads(nt) reduction(min : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    bool ok = batch == nullptr || batch_in_range(batch[i]);
    for (int a = 0; a < 3 && ok; ++a) {
      const double q = std::floor(double(p[3 * i + a]) / vs[a]);
      ok = std::isfinite(q) && q >= double(kCoordMin) && q <= double(kCoordMax);
    }
    if (!ok) bad = std::min(bad, i);
  }
  if (bad != kNone) return bad;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    int64_t q[3];
    for (int a = 0; a < 3; ++a) q[a] = int64_t(std::floor(double(p[3 * i + a]) / vs[a]));
    keys[i] = pack_key(batch ? batch[i] : 0, q[0], q[1], q[2]);
  }
  return -1;
}

std::vector<double> voxel_size_vec(const std::vector<double>& voxel_size) {
  if (voxel_size.size() != 3) value_error("voxel_size must have 3 entries");
  for (double v : voxel_size)
    if (!(v > 0) || !std::isfinite(v)) value_error("voxel_size must be positive and finite");
  return voxel_size;
}

py::array_t<int64_t> quantize(py::array points, std::vector<double> voxel_size,
                              py::object batch_obj, int num_threads) {
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
  auto keys = empty_array<int64_t>({n});
  int64_t bad;
  if (points.dtype().is(py::dtype::of<float>())) {
    auto p = as_carray<float>(points, "points");
    py::gil_scoped_release release;
    bad = quantize_impl(p.data(), b, n, vs.data(), keys.mutable_data(), nt);
  } else {
    auto p = as_carray<double>(points, "points");
    py::gil_scoped_release release;
    bad = quantize_impl(p.data(), b, n, vs.data(), keys.mutable_data(), nt);
  }
  if (bad >= 0 && b != nullptr && !batch_in_range(b[bad]))
    value_error("batch[" + std::to_string(bad) + "] = " + std::to_string(b[bad]) +
                " is outside [0, " + std::to_string(kBatchMax) + "]");
  if (bad >= 0)
    value_error("points row " + std::to_string(bad) +
                " cannot be voxelised: coordinates must be finite and points / voxel_size must "
                "lie in [" + std::to_string(kCoordMin) + ", " + std::to_string(kCoordMax) +
                "] (shift the cloud or use a larger voxel_size); batch in [0, " +
                std::to_string(kBatchMax) + "]");
  return keys;
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
                    const int64_t* st, const int64_t* keys, const int64_t* rows, int64_t m,
                    int64_t* idx, F* w, int nt) {
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
      bool ok = true;
      for (int a = 0; a < 3; ++a) {
        const int bit = (corner >> (2 - a)) & 1;
        // Range-check the coordinate as a double before any integer cast.
        const double qd = (base[a] + bit) * double(st[a]);
        ok = ok && qd >= double(kCoordMin) && qd <= double(kCoordMax);
        q[a] = ok ? int64_t(qd) : 0;
        weight *= bit ? frac[a] : 1 - frac[a];
      }
      int64_t row = -1;
      if (ok) {
        const int64_t key = pack_key(batch ? batch[i] : 0, q[0], q[1], q[2]);
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
                              carray<int64_t> sorted_keys, carray<int64_t> sorted_rows,
                              int64_t num_voxels, int num_threads) {
  check_2d(points, 3, "points");
  const auto vs = voxel_size_vec(voxel_size);
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
      if (!batch_in_range(b[i])) value_error("batch index out of range at point " + std::to_string(i));
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
      trilinear_impl(p.data(), b, n, vs.data(), stride.data(), sorted_keys.data(), r, m, ip, wp, nt);
    }
    return py::make_tuple(idx, w);
  }
  auto p = as_carray<double>(points, "points");
  auto w = empty_array<double>({n, 8});
  double* wp = w.mutable_data();
  int64_t* ip = idx.mutable_data();
  {
    py::gil_scoped_release release;
    trilinear_impl(p.data(), b, n, vs.data(), stride.data(), sorted_keys.data(), r, m, ip, wp, nt);
  }
  return py::make_tuple(idx, w);
}

}  // namespace

void bind_voxelize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("points"), py::arg("voxel_size"), py::arg("batch"),
        py::arg("num_threads"), "Keys of floor(points / voxel_size) with batch; ValueError on bad rows.");
  m.def("segment_reduce", &segment_reduce, py::arg("feats"), py::arg("perm"), py::arg("seg_ptr"),
        py::arg("mode"), py::arg("num_threads"),
        "Reduce rows perm[seg_ptr[j]:seg_ptr[j+1]] of feats: mode 0 sum, 1 mean, 2 max, 3 first.");
  m.def("trilinear_neighbors", &trilinear_neighbors, py::arg("points"), py::arg("batch"),
        py::arg("voxel_size"), py::arg("stride"), py::arg("sorted_keys"), py::arg("sorted_rows"),
        py::arg("num_voxels"), py::arg("num_threads"),
        "(idx (N, 8), weights (N, 8)) of the 8 voxels around each point; -1 where inactive.");
}

}  // namespace ps
