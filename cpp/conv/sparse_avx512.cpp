// The vector-sparse forward kernel (sparse.h) compiled for AVX-512 (F, VL,
// BW, DQ) + FMA: one 64-byte vector per panel (16 floats, 8 doubles: the
// panels of every build), a tile of kSparseMR rows, one broadcast FMA
// per listed row and tile row, masked stores for a partial last panel; two
// adjacent panels that list the same rows (SparseApplyArgs::twin) in one
// tile of two vectors a row, one broadcast for two FMAs (micro_twin). On
// an Intel Xeon (KITTI sweep, one thread, bench/ab_builds.py in lockstep,
// weights pruned in vectors of two panels): C = 64 75% / 50% 0.77x / 0.77x
// the time of one panel at a time, C = 128 0.75x / 0.73x.
// sparse.cpp calls it only where isa_runs(Isa::avx512): from one panel of
// output columns where its FMAs run at full width (Intel, AMD Zen 5), else from 128
// (kSparse512MinColsWide, kSparse512MinCols). Below: the masked weight
// gradient's build (sparse_wgrad.h), called at full width only
// (wgrad_masked_isa).
//
// Bit-identical to the 32-byte builds' apply_sparse and to every FMA build's
// dense apply: per row and panel acc starts as C[r] (or bias/zero for a
// block's first offset, tile_load in fused_kernels.h) and takes fma(A[r][c],
// B[c][panel], acc) over the listed rows c in list order; then C[r] = acc.
// Only the lanes per vector and the rows per tile differ, which change no
// element's arithmetic.
#include <omp.h>

#include <cstdint>

#include "conv/fused.h"
#include "conv/sparse.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define PS_CONV_ISA Isa::avx512
#define PS_CONV_VEC_BYTES 64
#define PS_CONV_KERNELS_ONLY  // fused_avx512.cpp holds this build's dense entry points
namespace ps {
namespace conv {
namespace avx512 {
#include "conv/fused_kernels.h"
#include "conv/sparse_walk.h"

namespace {

// Rows per tile: one accumulator each (of 32 vector registers). 8 rather
// than 12 since the kernels sum from the output rows (tile_load) and work
// blocks hold 512 rows: on Zen 4 (KITTI sweep, C = 128, one thread, three
// builds in turn, twice) 8 rows ran 64 of 128 rows listed per panel in 55.6 /
// 56.1 ms against 58.3 / 58.1 ms for 12 rows and 69.8 / 68.6 ms for 16.
#ifndef PS_CONV_SPARSE512_MR
#define PS_CONV_SPARSE512_MR 8
#endif
constexpr int kSparseMR = PS_CONV_SPARSE512_MR;
static_assert(lanes<float>() == sparse_panel<float>() && lanes<double>() == sparse_panel<double>(),
              "one vector per sparse panel");

// Written with intrinsics, not fused_kernels.h's vfma / vadd_masked: GCC
// does not define __AVX512F__ / __FMA__ under `#pragma GCC target` in C++,
// so those fall back to a * b + c (contracted) and unmasked tails there.
inline Vec<float>::type fma_lanes(Vec<float>::type a, Vec<float>::type b, Vec<float>::type c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline Vec<double>::type fma_lanes(Vec<double>::type a, Vec<double>::type b, Vec<double>::type c) {
  return _mm512_fmadd_pd(a, b, c);
}
// s[0:n] in the low lanes, zero above (n < lanes); p[0:n] = v[0:n], the
// other lanes of p untouched.
inline Vec<float>::type load_masked(const float* s, int n) {
  return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), s);
}
inline Vec<double>::type load_masked(const double* s, int n) {
  return _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1u), s);
}
inline void store_masked(float* p, Vec<float>::type v, int n) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v);
}
inline void store_masked(double* p, Vec<double>::type v, int n) {
  _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1u), v);
}

// C[r][0:ncols] (+)= sum_i A[r][idx[i]] * B[i][0:L] for r < mr, B packed (n,
// L), summed from C[r] (or init, as tile_load's in fused_kernels.h) in i
// order. Rows r >= mr of `a` and `c` must be readable (apply_pairs repeats a
// valid one); only rows r < mr are written.
template <typename T>
inline void micro_panel(int64_t n, const int32_t* __restrict idx, const T* const* a, const T* __restrict b,
                        T* const* c, int mr, int64_t ncols, const T* init) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  V acc[kSparseMR];
  const T* x[kSparseMR];
#pragma GCC unroll 16
  for (int r = 0; r < kSparseMR; ++r) {
    const T* s = init ? init : c[r];
    acc[r] = ncols == L ? vload(s) : load_masked(s, int(ncols));
    x[r] = a[r];
  }
  for (int64_t i = 0; i < n; ++i) {
    const V bv = vload(b + i * L);
    const int64_t off = idx[i];
#pragma GCC unroll 16
    for (int r = 0; r < kSparseMR; ++r) acc[r] = fma_lanes(vbroadcast(x[r][off]), bv, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSparseMR; ++r) {
    if (r >= mr) continue;
    if (ncols == L)
      vstore(c[r], acc[r]);
    else
      store_masked(c[r], acc[r], int(ncols));
  }
}

// micro_panel over two whole panels that list the same rows (idx): B0 and B1
// their packed rows, C[r] the first panel's column 0, init (or null) 2 L
// values. Per listed row one index, two weight vectors and a broadcast per
// tile row for two FMAs, as the dense tiles: micro_panel's one vector a row
// spends a broadcast per FMA, which bound it by the loads where the FMAs run
// at full width. The same sums per element as micro_panel's.
template <typename T>
inline void micro_twin(int64_t n, const int32_t* __restrict idx, const T* const* a, const T* __restrict b0,
                       const T* __restrict b1, T* const* c, int mr, const T* init) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  V acc0[kSparseMR], acc1[kSparseMR];
  const T* x[kSparseMR];
#pragma GCC unroll 16
  for (int r = 0; r < kSparseMR; ++r) {
    const T* s = init ? init : c[r];
    acc0[r] = vload(s);
    acc1[r] = vload(s + L);
    x[r] = a[r];
  }
  for (int64_t i = 0; i < n; ++i) {
    const V bv0 = vload(b0 + i * L), bv1 = vload(b1 + i * L);
    const int64_t off = idx[i];
#pragma GCC unroll 16
    for (int r = 0; r < kSparseMR; ++r) {
      const V xv = vbroadcast(x[r][off]);
      acc0[r] = fma_lanes(xv, bv0, acc0[r]);
      acc1[r] = fma_lanes(xv, bv1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSparseMR; ++r) {
    if (r >= mr) continue;
    vstore(c[r], acc0[r]);
    vstore(c[r] + L, acc1[r]);
  }
}

// The shared walk (sparse_walk.h) in this build's tiles; lists packed by
// sparse.cpp. Where it marked twins (SparseApplyArgs::twin), each tile runs
// offset k's panels here, twins through micro_twin and the others through
// micro_panel, as the walk would one by one.
template <typename T, bool kScratch>
void apply_sparse_impl(const SparseApplyArgs<T>& s) {
  constexpr int64_t L = lanes<T>();
  const ApplyArgs<T>& a = s.base;
  const int64_t np = (a.cols + L - 1) / L;
  const auto micro = [](auto... args) { micro_panel<T>(args...); };
  if (s.twin == nullptr) {
    walk_listed_panels<kSparseMR, L, kScratch>(s, micro, [](auto...) { return false; });
    return;
  }
  const T zero[2 * L] = {};
  walk_listed_panels<kSparseMR, L, kScratch>(
      s, micro,
      [&s, &a, &zero, np](const int32_t* count, const int32_t* idx, const int64_t* start, const T* const* arow,
                          T* const* crow, bool first) {
        const uint8_t* twin = s.twin + (count - s.count);
        T* c[kSparseMR];
        for (int64_t j = 0; j < np;) {
          const int64_t width = twin[j] ? 2 : 1;
          if (count[j] == 0 && !first) {  // a twin lists nothing either
            j += width;
            continue;
          }
          for (int r = 0; r < kSparseMR; ++r) c[r] = crow[r] + j * L;
          const T* init = first ? (a.bias ? a.bias + j * L : zero) : nullptr;
          const T* b = a.wpack + start[j] * L;
          if (width == 2) {
            micro_twin<T>(count[j], idx + j * a.kc, arow, b, a.wpack + start[j + 1] * L, c, kSparseMR, init);
          } else {
            const int64_t ncols = a.cols - j * L < L ? a.cols - j * L : L;
            micro_panel<T>(count[j], idx + j * a.kc, arow, b, c, kSparseMR, ncols, init);
          }
          j += width;
        }
        return true;
      });
}

}  // namespace

void apply_sparse(const SparseApplyArgs<float>& a) { apply_sparse_either(a); }
void apply_sparse(const SparseApplyArgs<double>& a) { apply_sparse_either(a); }

// The masked weight gradient in this build's 8 x 32 tiles (lists per 32
// columns: two sparse panels), sparse_wgrad.h.
#include "conv/sparse_wgrad.h"

}  // namespace avx512
}  // namespace conv
}  // namespace ps
#pragma GCC pop_options
#else
namespace ps {
namespace conv {
namespace avx512 {
// Never called: isa_runs(Isa::avx512) is false in this build.
void apply_sparse(const SparseApplyArgs<float>& a) { generic::apply_sparse(a); }
void apply_sparse(const SparseApplyArgs<double>& a) { generic::apply_sparse(a); }
void wgrad_masked(const MaskedWgradArgs<float>& a) { generic::wgrad_masked(a); }
void wgrad_masked(const MaskedWgradArgs<double>& a) { generic::wgrad_masked(a); }
}  // namespace avx512
}  // namespace conv
}  // namespace ps
#endif
