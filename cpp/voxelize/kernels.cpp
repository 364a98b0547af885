// Voxelisation kernels (voxelize.h).
#include "voxelize/voxelize.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <string>

#include "coords/unique.h"
#include "scratch.h"

namespace ps {
namespace voxelize {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

}  // namespace

namespace {
// floor(v) into q when it lies in [kCoordMin, kCoordMax] (false otherwise,
// NaN included): the truncation, one less for a negative non-integer. No
// call of std::floor, which the generic x86-64 build (no SSE4.1 round)
// makes a libm call per coordinate.
inline bool floor_coord(double v, int64_t& q) {
  if (!(v >= double(kCoordMin) && v < double(kCoordMax) + 1.0)) return false;
  const int64_t t = int64_t(v);
  q = t - int64_t(double(t) > v);
  return true;
}
}  // namespace

template <typename F>
int64_t quantize_bounds(const F* p, const int64_t* batch, int64_t n, const double* vs, Bounds& out, int32_t* q,
                        int nt) {
  int64_t bad = kNone;
  int64_t lb = 0, lx = kNone, ly = kNone, lz = kNone;
  int64_t hb = 0, hx = -kNone, hy = -kNone, hz = -kNone;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad, lx, ly, lz) \
    reduction(max : hb, hx, hy, hz)
  for (int64_t i = 0; i < n; ++i) {
    int64_t c[3] = {0, 0, 0};
    bool ok = batch == nullptr || (batch[i] >= 0 && batch[i] <= kBatchMax);
    ok = ok && floor_coord(double(p[3 * i]) / vs[0], c[0]);
    ok = ok && floor_coord(double(p[3 * i + 1]) / vs[1], c[1]);
    ok = ok && floor_coord(double(p[3 * i + 2]) / vs[2], c[2]);
    if (!ok) {
      bad = std::min(bad, i);
      continue;
    }
    q[3 * i] = int32_t(c[0]), q[3 * i + 1] = int32_t(c[1]), q[3 * i + 2] = int32_t(c[2]);
    hb = std::max(hb, batch ? batch[i] : 0);
    lx = std::min(lx, c[0]), hx = std::max(hx, c[0]);
    ly = std::min(ly, c[1]), hy = std::max(hy, c[1]);
    lz = std::min(lz, c[2]), hz = std::max(hz, c[2]);
  }
  if (n > 0) {
    const int64_t l[4] = {lb, lx, ly, lz}, h[4] = {hb, hx, hy, hz};
    std::copy(l, l + 4, out.lo);
    std::copy(h, h + 4, out.hi);
  }
  return bad == kNone ? -1 : bad;
}

void check_quantized(int64_t bad, const int64_t* b) {
  if (bad >= 0 && b != nullptr && (b[bad] < 0 || b[bad] > kBatchMax))
    value_error("batch[" + std::to_string(bad) + "] = " + std::to_string(b[bad]) + " is outside [0, " +
                std::to_string(kBatchMax) + "]");
  if (bad >= 0)
    value_error("points row " + std::to_string(bad) +
                " cannot be voxelised: coordinates must be finite and points / voxel_size must "
                "lie in the int32 range [" + std::to_string(kCoordMin) + ", " + std::to_string(kCoordMax) +
                "] (shift the cloud or use a larger voxel_size)");
}

void quantize_keys(const int32_t* q, const int64_t* batch, int64_t n, const KeyLayout& layout, int64_t* keys,
                   int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t i = 0; i < n; ++i) keys[i] = layout.pack(batch ? batch[i] : 0, q[3 * i], q[3 * i + 1], q[3 * i + 2]);
}

template <typename F>
Voxels group_points(const F* p, const int64_t* batch, int64_t n, const double* vs, int64_t* perm,
                    int64_t* inverse, int num_threads) {
  const int nt = stream_threads(num_threads, n);
  Bounds bounds;
  Scratch<int64_t> keys(kScratchKeys, n);
  // Each point's voxel, quantised once (one division a coordinate) and
  // packed into its key once the bounds have fixed the layout.
  Scratch<int32_t> q(kScratchQuantized, 3 * n);
  check_quantized(quantize_bounds(p, batch, n, vs, bounds, q.get(), nt), batch);
  const int64_t none[3] = {0, 0, 0};
  Voxels voxels;
  voxels.layout = fit_layout(bounds, none);
  quantize_keys(q.get(), batch, n, voxels.layout, keys.get(), nt);
  group_keys(keys.get(), n, voxels.sorted, perm, voxels.starts, inverse, num_threads);
  return voxels;
}

void voxel_coords(const Voxels& voxels, int32_t* coords, int64_t* seg_ptr, int nt) {
  const int64_t m = voxels.count();
  const KeyLayout layout = voxels.layout;
  const int64_t* sorted = voxels.sorted.data();
  const int64_t* starts = voxels.starts.data();
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t j = 0; j < m; ++j) layout.unpack(sorted[starts[j]], coords + 4 * j);
  std::copy(starts, starts + m + 1, seg_ptr);
}

namespace {
// The rows of a voxel sit anywhere in x (perm follows the sorted keys, not
// the points' order), and voxels of one to three points make every segment
// end a mispredicted branch that drops the loads in flight: each voxel
// prefetches the row kAhead points ahead.
constexpr int64_t kAhead = 16;

// o = the sum (mean: / count) of the rows perm[lo:hi] of C columns: the same
// sums as the generic loop (from zero, in row order), in registers.
template <int C, typename F>
inline void sum_segment(const F* x, const int64_t* perm, int64_t lo, int64_t hi, bool mean, F* o) {
  F acc[C];
  for (int k = 0; k < C; ++k) acc[k] = F(0);
  for (int64_t i = lo; i < hi; ++i) {
    const F* s = x + perm[i] * C;
    for (int k = 0; k < C; ++k) acc[k] += s[k];
  }
  if (mean) {
    const F count = F(hi - lo);
    for (int k = 0; k < C; ++k) acc[k] /= count;
  }
  for (int k = 0; k < C; ++k) o[k] = acc[k];
}

template <int C, typename F>
void sum_voxels(const F* x, const int64_t* perm, const int64_t* seg, int64_t m, bool mean, F* out, int nt) {
  const int64_t n = seg[m];
#pragma omp parallel for num_threads(nt) schedule(dynamic, 256)
  for (int64_t j = 0; j < m; ++j) {
    if (seg[j] + kAhead < n) __builtin_prefetch(x + perm[seg[j] + kAhead] * C);
    sum_segment<C>(x, perm, seg[j], seg[j + 1], mean, out + j * C);
  }
}
}  // namespace

template <typename F>
void reduce(const F* x, int64_t c, const int64_t* perm, const int64_t* seg, int64_t m,
                 int mode, F* out, int64_t* arg, int nt) {
  if (mode == kSum || mode == kMean) {  // a few columns (points' features): summed in registers
    const bool mean = mode == kMean;
    switch (c) {
      case 1: return sum_voxels<1>(x, perm, seg, m, mean, out, nt);
      case 2: return sum_voxels<2>(x, perm, seg, m, mean, out, nt);
      case 3: return sum_voxels<3>(x, perm, seg, m, mean, out, nt);
      case 4: return sum_voxels<4>(x, perm, seg, m, mean, out, nt);
      case 5: return sum_voxels<5>(x, perm, seg, m, mean, out, nt);
      case 6: return sum_voxels<6>(x, perm, seg, m, mean, out, nt);
      case 7: return sum_voxels<7>(x, perm, seg, m, mean, out, nt);
      case 8: return sum_voxels<8>(x, perm, seg, m, mean, out, nt);
      default: break;
    }
  }
  const int64_t n = seg[m];
#pragma omp parallel for num_threads(nt) schedule(dynamic, 256)
  for (int64_t j = 0; j < m; ++j) {
    F* o = out + j * c;
    const int64_t lo = seg[j], hi = seg[j + 1];
    if (lo + kAhead < n) __builtin_prefetch(x + perm[lo + kAhead] * c);
    if (mode == 3) {
      const F* src = x + perm[lo] * c;
      std::copy(src, src + c, o);
      if (arg) arg[j] = perm[lo];
      continue;
    }
    if (mode == 2) {
      const F* src = x + perm[lo] * c;
      std::copy(src, src + c, o);
      // NaN propagates (as torch.amax): the first NaN row of a voxel wins
      // and stays; otherwise the first row holding the maximum.
      if (arg) {
        int64_t* a = arg + j * c;
        std::fill(a, a + c, perm[lo]);
        for (int64_t i = lo + 1; i < hi; ++i) {
          const F* s = x + perm[i] * c;
          for (int64_t k = 0; k < c; ++k)
            if (s[k] > o[k] || (s[k] != s[k] && o[k] == o[k])) o[k] = s[k], a[k] = perm[i];
        }
      } else {  // (no gradient to route: the maxima alone)
        for (int64_t i = lo + 1; i < hi; ++i) {
          const F* s = x + perm[i] * c;
          for (int64_t k = 0; k < c; ++k)
            if (s[k] > o[k] || (s[k] != s[k] && o[k] == o[k])) o[k] = s[k];
        }
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

namespace {

// std::lower_bound without branches on the comparisons (they become
// conditional moves): a search over scattered keys mispredicts about half
// its steps, which cost more than its loads.
inline const int64_t* lower_bound_flat(const int64_t* first, int64_t n, int64_t key) {
  if (n <= 0) return first;
  while (n > 1) {
    const int64_t half = n >> 1;
    first = first[half] < key ? first + half : first;
    n -= half;
  }
  return first + (*first < key);
}

}  // namespace

template <typename F>
void trilinear(const F* p, const int64_t* batch, int64_t n, const double* vs, const int64_t* st,
               const KeyLayout& layout, const int64_t* keys, const int64_t* rows, int64_t m, int64_t* idx, F* w,
               int nt) {
  const int64_t* end = keys + m;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double base[3], frac[3];
    for (int a = 0; a < 3; ++a) {
      const double u = double(p[3 * i + a]) / (vs[a] * double(st[a])) - 0.5;
      base[a] = std::floor(u);
      frac[a] = u - base[a];
    }
    const int64_t b = batch ? batch[i] : 0;
    int64_t key[8];
    bool ok[8];
    double weight[8];
    for (int corner = 0; corner < 8; ++corner) {
      int64_t q[3];
      double wc = 1;
      bool in = b <= layout.field_max(0);  // other batches hold no voxel
      for (int a = 0; a < 3; ++a) {
        const int bit = (corner >> (2 - a)) & 1;
        // Check the corner against the layout as a double before any integer
        // cast (exact: the bounds are below 2^53); outside it no voxel is active.
        const double qd = (base[a] + bit) * double(st[a]);
        in = in && qd >= double(layout.origin[a]) && qd <= double(layout.origin[a] + layout.field_max(a + 1));
        q[a] = in ? int64_t(qd) : 0;
        wc *= bit ? frac[a] : 1 - frac[a];
      }
      ok[corner] = in;
      key[corner] = in ? layout.pack(b, q[0], q[1], q[2]) : 0;
      weight[corner] = wc;
    }
    // The corners in 4 columns of 2 along z (corner 2c, 2c + 1). One search
    // over all the keys a column, the four side by side (the same halving
    // steps: four independent chains of loads), for its first active
    // corner. z is the key's lowest field: the column's second key is the
    // first's + st[2], within st[2] places after where the first's search
    // ended (the keys are distinct), and is searched there alone.
    int64_t target[4];
    const int64_t* at[4];
    for (int c = 0; c < 4; ++c) {
      target[c] = ok[2 * c] ? key[2 * c] : key[2 * c + 1];
      at[c] = keys;
    }
    if (m > 0) {
      int64_t len = m;
      while (len > 1) {
        const int64_t half = len >> 1;
        for (int c = 0; c < 4; ++c) at[c] = at[c][half] < target[c] ? at[c] + half : at[c];
        len -= half;
      }
      for (int c = 0; c < 4; ++c) at[c] += *at[c] < target[c];
    }
    int64_t row[8];
    for (int c = 0; c < 4; ++c) {
      const int lo = 2 * c, hi = 2 * c + 1;
      row[lo] = row[hi] = -1;
      const int64_t* found = at[c];
      if (ok[lo]) {
        if (found != end && *found == key[lo]) row[lo] = rows[found - keys];
        if (ok[hi]) found = lower_bound_flat(found, std::min<int64_t>(end - found, key[hi] - key[lo] + 1), key[hi]);
      }
      if (ok[hi] && found != end && *found == key[hi]) row[hi] = rows[found - keys];
    }
    // Weights in double: each is rounded to F once, after renormalising.
    double total = 0;
    for (int corner = 0; corner < 8; ++corner) {
      idx[8 * i + corner] = row[corner];
      weight[corner] = row[corner] >= 0 ? weight[corner] : 0.0;
      total += weight[corner];
    }
    for (int corner = 0; corner < 8; ++corner)
      w[8 * i + corner] = total > 0 ? F(weight[corner] / total) : F(0);
  }
}

#define PS_VOXELIZE_INSTANTIATE(F)                                                                        \
  template int64_t quantize_bounds<F>(const F*, const int64_t*, int64_t, const double*, Bounds&, int32_t*, int); \
  template Voxels group_points<F>(const F*, const int64_t*, int64_t, const double*, int64_t*, int64_t*, int);  \
  template void reduce<F>(const F*, int64_t, const int64_t*, const int64_t*, int64_t, int, F*, int64_t*, int); \
  template void trilinear<F>(const F*, const int64_t*, int64_t, const double*, const int64_t*,                 \
                             const KeyLayout&, const int64_t*, const int64_t*, int64_t, int64_t*, F*, int);
PS_VOXELIZE_INSTANTIATE(float)
PS_VOXELIZE_INSTANTIATE(double)
#undef PS_VOXELIZE_INSTANTIATE

}  // namespace voxelize
}  // namespace ps
