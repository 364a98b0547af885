// Runtime dispatch of the vector-sparse convolution kernels (see sparse.h):
// the listed weight rows are packed here, once for every build (the panels
// are the same on every build), and the weight-gradient scratch is sized
// here for the build that runs.
#include "conv/sparse.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace ps {
namespace conv {
namespace {

// Output columns from which the avx512 apply_sparse runs where avx512 is
// asked. Measured on Zen 4 (KITTI sweep, k = 3, one thread, kernels alone,
// interleaved against avx2, 3 runs): C = 128 vector 75% 3-6% faster, 50%
// equal; C = 64 6-9% slower in 2 of 3 runs (short lists: 16 rows per panel
// at 75%, where the 12-row tile's tails and per-panel stores weigh more).
// Again with its 8-row tile (bench/sparse_isa.py, two runs): C = 64 still
// 4-7% slower (75%: 9.70 / 9.76 ms against 9.27 / 9.47; 50%: 15.5 / 15.8
// against 14.5 / 14.7).
// On an Intel Xeon, whose 512-bit FMAs run at full width
// (avx512_full_width()), the avx512 kernel ran faster than the avx2 one at
// every width (bench/sparse_isa.py, one thread, three runs at C = 64 and
// 128, one at 16-48; over the dense kernel, avx512 / avx2): C = 64 75%
// 1.85-1.92x / 1.79-1.85x, 50% 1.19-1.32x / 1.11-1.14x; C = 128 equal to
// 6% faster; C = 16, 32, 48 2-6% faster. There it runs from one panel of
// columns (kSparse512MinColsWide).
constexpr int64_t kSparse512MinCols = 128;
constexpr int64_t kSparse512MinColsWide = 16;

// The 32-byte build that runs for `asked` (isa_arg lets through only builds
// that run): avx2 wherever it runs unless generic is asked (the vector
// forward below kSparse512MinCols and the masked weight gradient where the
// avx512 FMAs run in halves: wgrad_masked_isa).
Isa narrow_isa(Isa asked) { return asked != Isa::generic && isa_runs(Isa::avx2) ? Isa::avx2 : Isa::generic; }

// The build of apply_sparse that runs for `asked` and `cols`: avx512 where
// it is asked and cols >= kSparse512MinCols (kSparse512MinColsWide on
// Intel and AMD Zen 5: avx512_full_width()), else narrow_isa's.
Isa sparse_isa(Isa asked, int64_t cols) {
  const int64_t from = avx512_full_width() ? kSparse512MinColsWide : kSparse512MinCols;
  return asked == Isa::avx512 && cols >= from ? Isa::avx512 : narrow_isa(asked);
}

// Whether p[0:n] holds a nonzero, as `p[j] != T(0)` for some j (-0.0 is
// zero, a NaN is not): the values' bits without their sign, or-ed, a loop
// GCC vectorises (the comparison per value did not vectorise: the decision
// and the packing of a (27, 64, 64) weight took some 80 us each a call).
template <typename T>
inline bool any_nonzero(const T* p, int64_t n) {
  typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type U;
  U acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    U u;
    std::memcpy(&u, p + j, sizeof(u));
    acc |= u << 1;
  }
  return acc != 0;
}

// Per offset k and panel p the rows c of B_k with a nonzero in the panel's
// columns: listed in idx, packed in order into wpack (panels of
// sparse_panel<T>() columns, zero past the last column), counted in count.
// Only the listed rows are written (the kernels read no others).
template <typename T>
void pack_sparse(const SparseApplyArgs<T>& s) {
  constexpr int64_t NR = sparse_panel<T>();
  const ApplyArgs<T>& a = s.base;
  const int64_t c_out = a.transpose ? a.kc : a.cols;
  const int64_t np = panels<T>(Isa::avx2, a.cols), K = a.pairs.kernel_volume;
  s.start[0] = 0;
  for (int64_t t = 0; t < K * np; ++t) {
    const int64_t k = t / np, p = t % np;
    const T* wk = a.w + k * a.kc * a.cols;
    T* dst = a.wpack + s.start[t] * NR;
    int32_t* list = s.idx + t * a.kc;
    int32_t n = 0;
    if (!a.transpose) {  // the panel's columns of row c are contiguous in W_k
      const int64_t ncols = std::min(NR, a.cols - p * NR);
      for (int64_t c = 0; c < a.kc; ++c) {
        const T* src = wk + c * c_out + p * NR;
        if (!any_nonzero(src, ncols)) continue;
        T* row = dst + n * NR;
        std::memcpy(row, src, sizeof(T) * size_t(ncols));
        for (int64_t j = ncols; j < NR; ++j) row[j] = T(0);
        list[n++] = int32_t(c);
      }
    } else {  // W_k^T: the panel's columns of row c are a column of W_k, read with a stride
      for (int64_t c = 0; c < a.kc; ++c) {
        T* row = dst + n * NR;  // written, and kept only when it holds a nonzero
        bool nonzero = false;
        for (int64_t j = 0; j < NR; ++j) {
          const int64_t col = p * NR + j;
          const T v = col < a.cols ? wk[col * c_out + c] : T(0);
          row[j] = v;
          nonzero |= v != T(0);
        }
        if (nonzero) list[n++] = int32_t(c);
      }
    }
    s.count[t] = n;
    s.start[t + 1] = s.start[t] + n;
  }
  if (s.twin == nullptr) return;
  for (int64_t t = 0; t < K * np; ++t) {
    const int64_t p = t % np;
    const int32_t n = s.count[t];
    s.twin[t] = p + 1 < np && (p + 2) * NR <= a.cols && s.count[t + 1] == n &&
                std::equal(s.idx + t * a.kc, s.idx + t * a.kc + n, s.idx + (t + 1) * a.kc);
  }
}

template <typename T>
void apply_sparse_with(SparseApplyArgs<T> s, Isa asked) {
  ApplyArgs<T>& a = s.base;
  const int64_t size = wpack_size<T>(Isa::avx2, a.pairs.kernel_volume, a.kc, a.cols);  // sparse panels
  std::unique_ptr<T[]> wpack(new T[size_t(size > 0 ? size : 1)]);  // written where listed (pack_sparse)
  a.wpack = wpack.get();
  const Isa isa = sparse_isa(asked, a.cols);
  // The pairs of panels that list the same rows, for the avx512 build's
  // two-vector tiles (the 32-byte builds' tiles are one panel wide): on
  // every CPU where that build runs, measured on an Intel Xeon (bench/
  // RESULTS.md stop 36) and an AMD Zen 5 (stop 50); on Zen 4 it runs from 128 columns, where weights
  // pruned in twins (tile_panels is 1 there) were not timed.
  std::vector<uint8_t> twin(isa == Isa::avx512 ? size_t(a.pairs.kernel_volume * panels<T>(Isa::avx2, a.cols)) : 0);
  s.twin = twin.empty() ? nullptr : twin.data();
  pack_sparse(s);
  std::unique_ptr<T[]> blocks;
  attach_blocks(a, isa, blocks);
  switch (isa) {
    case Isa::avx512: avx512::apply_sparse(s); break;
    case Isa::avx2: avx2::apply_sparse(s); break;
    default: generic::apply_sparse(s); break;
  }
}

// The build of wgrad_masked that runs for `asked`: avx512 where it is asked
// and its FMAs run at full width (avx512_full_width(): Intel, AMD Zen 5), else
// narrow_isa's.
Isa wgrad_masked_isa(Isa asked) {
  return asked == Isa::avx512 && avx512_full_width() ? Isa::avx512 : narrow_isa(asked);
}

template <typename T>
void wgrad_masked_with(MaskedWgradArgs<T> m, Isa asked) {
  const Isa isa = wgrad_masked_isa(asked);
  WgradArgs<T>& a = m.base;
  std::vector<T> scratch(size_t(a.nt * wgrad_scratch<T>(isa, a.c_in, a.c_out)));
  a.scratch = scratch.data();
  switch (isa) {
    case Isa::avx512: avx512::wgrad_masked(m); break;
    case Isa::avx2: avx2::wgrad_masked(m); break;
    default: generic::wgrad_masked(m); break;
  }
}

}  // namespace

template <typename T>
void count_vectors(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose, int32_t* counts,
                   uint8_t* twins) {
  constexpr int64_t NR = sparse_panel<T>();
  const int64_t rows = transpose ? c_out : c_in, np = panels<T>(Isa::avx2, transpose ? c_in : c_out);
  std::vector<uint8_t> mark(rows * np);
  for (int64_t k = 0; k < K; ++k) {
    // One contiguous pass over W[k] (c, j): the vector of (c, j) is
    // (row c, panel j / NR), or transposed (row j, panel c / NR).
    std::fill(mark.begin(), mark.end(), uint8_t(0));
    const T* wk = w + k * c_in * c_out;
    for (int64_t c = 0; c < c_in; ++c) {
      const T* row = wk + c * c_out;
      if (transpose) {
        for (int64_t j = 0; j < c_out; ++j) mark[j * np + c / NR] |= row[j] != T(0);
        continue;
      }
      for (int64_t p = 0; p < np; ++p) mark[c * np + p] = any_nonzero(row + p * NR, std::min(NR, c_out - p * NR));
    }
    for (int64_t p = 0; p < np; ++p) {
      int32_t n = 0;
      for (int64_t r = 0; r < rows; ++r) n += mark[r * np + p];
      counts[k * np + p] = n;
    }
    if (twins == nullptr) continue;
    const int64_t cols = transpose ? c_in : c_out;
    for (int64_t p = 0; p < np; ++p) {
      bool same = p + 1 < np && (p + 2) * NR <= cols && (p == 0 || !twins[k * np + p - 1]);
      for (int64_t r = 0; same && r < rows; ++r) same = mark[r * np + p] == mark[r * np + p + 1];
      twins[k * np + p] = same;
    }
  }
}
template <typename T>
Execution choose_execution(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose,
                           const uint8_t* region, double threshold, uint8_t* keep, double twin_threshold) {
  const int64_t rows = transpose ? c_out : c_in, np = panels<T>(Isa::avx2, transpose ? c_in : c_out);
  std::vector<int32_t> counts(size_t(K * np));
  std::vector<uint8_t> twins(twin_threshold >= 0 ? size_t(K * np) : 0);
  count_vectors(w, K, c_in, c_out, transpose, counts.data(), twins.empty() ? nullptr : twins.data());
  int64_t kept = 0, listed = 0, twinned = 0;
  bool all_kept = true;
  for (int64_t k = 0; k < K; ++k) {
    int64_t n = 0;
    for (int64_t p = 0; p < np; ++p) n += counts[k * np + p];
    keep[k] = n > 0 && (region == nullptr || region[k] != 0);
    all_kept = all_kept && keep[k];
    if (keep[k]) {
      ++kept;
      listed += n;
      for (int64_t p = 0; p < np && !twins.empty(); ++p)
        if (twins[k * np + p]) twinned += counts[k * np + p] + counts[k * np + p + 1];
    }
  }
  const int64_t capacity = kept * rows * np;
  // Both counts are exact in a double: the quotient is the correctly
  // rounded one, as Python's int / int.
  const double density = capacity ? double(listed) / double(capacity) : 0.0;
  const double limit =
      twin_threshold >= 0 && listed ? threshold + (twin_threshold - threshold) * double(twinned) / double(listed)
                                    : threshold;
  return Execution{all_kept, density <= limit, density};
}
template Execution choose_execution<float>(const float*, int64_t, int64_t, int64_t, bool, const uint8_t*, double,
                                           uint8_t*, double);
template Execution choose_execution<double>(const double*, int64_t, int64_t, int64_t, bool, const uint8_t*, double,
                                            uint8_t*, double);

template void count_vectors<float>(const float*, int64_t, int64_t, int64_t, bool, int32_t*, uint8_t*);
template void count_vectors<double>(const double*, int64_t, int64_t, int64_t, bool, int32_t*, uint8_t*);

void apply_sparse(SparseApplyArgs<float> a, Isa isa) { apply_sparse_with(a, isa); }
void apply_sparse(SparseApplyArgs<double> a, Isa isa) { apply_sparse_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<float> a, Isa isa) { wgrad_masked_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<double> a, Isa isa) { wgrad_masked_with(a, isa); }

}  // namespace conv
}  // namespace ps
