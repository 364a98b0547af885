// The bf16 inference forward of the fused convolution (fused.h): the same
// blocks, offsets and row tiles as apply_impl (fused_kernels.h), with
// `vdpbf16ps`: per step a tile of 8 rows x 32 columns adds
// x[r][2q] * W[2q][j] + x[r][2q+1] * W[2q+1][j] into float32 accumulators
// (the products of two bf16 are exact in float32). Weights are packed per
// offset and 32-column panel as channel pairs (low half: the even channel).
// Compiled only where GCC targets x86; dispatch asks bf16_runs() first.
#include <omp.h>

#include <cstdint>
#include <vector>

#include "conv/fused.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")
namespace ps {
namespace conv {
namespace {

constexpr int kRows = 8;     // rows per tile
constexpr int64_t kCols = 32;  // columns per tile: two vectors of 16 floats

// wpack[k][p][q][j] = W_k[2q][p*32+j] | W_k[2q+1][p*32+j] << 16 (zero past
// the last channel or column).
void pack(const ApplyBf16Args& a, uint32_t* wpack, int64_t np, int64_t kp) {
  const int64_t K = a.pairs.kernel_volume;
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* wk = a.w + k * a.kc * a.cols;
    for (int64_t p = 0; p < np; ++p) {
      uint32_t* dst = wpack + (k * np + p) * kp * kCols;
      for (int64_t q = 0; q < kp; ++q)
        for (int64_t j = 0; j < kCols; ++j) {
          const int64_t col = p * kCols + j;
          uint32_t lo = 0, hi = 0;
          if (col < a.cols) {
            lo = wk[2 * q * a.cols + col];
            if (2 * q + 1 < a.kc) hi = wk[(2 * q + 1) * a.cols + col];
          }
          dst[q * kCols + j] = lo | hi << 16;
        }
    }
  }
}

// Channel pair q of a row: (x[2q], x[2q+1]) as one 32-bit lane, zero past kc.
inline uint32_t pair_of(const uint16_t* x, int64_t q, int64_t kc) {
  if (2 * q + 1 < kc) {
    uint32_t v;
    __builtin_memcpy(&v, x + 2 * q, 4);
    return v;
  }
  return x[2 * q];
}

// c[r][0:ncols] += tile rows r < mr (init: c[r] = init + tile rows, the
// bias or zero on a block's first offset); rows r >= mr of `a` and `c`
// repeat a valid row. The accumulators start from c's rows (or init), whose
// loads so issue before the products (as tile_load in fused_kernels.h).
void micro(int64_t kc, int64_t kp, const uint16_t* const* a, const uint32_t* b, float* const* c, int mr,
           int64_t ncols, const float* init) {
  const int n0 = int(ncols < 16 ? ncols : 16), n1 = int(ncols - n0);
  const __mmask16 m0 = __mmask16((1u << n0) - 1u), m1 = __mmask16((1u << n1) - 1u);
  __m512 acc0[kRows], acc1[kRows];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    const float* s = init ? init : c[r];
    acc0[r] = _mm512_maskz_loadu_ps(m0, s);
    acc1[r] = _mm512_maskz_loadu_ps(m1, s + 16);
  }
  for (int64_t q = 0; q < kp; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + q * kCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + q * kCols + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(int(pair_of(a[r], q, kc)));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, b1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    if (r >= mr) continue;
    _mm512_mask_storeu_ps(c[r], m0, acc0[r]);
    if (n1 > 0) _mm512_mask_storeu_ps(c[r] + 16, m1, acc1[r]);
  }
}

// The pairs [lo, hi) of offset k in tiles of kRows (ident: the pairs (q, q);
// first: store bias or zero + the products, see apply_impl).
void apply_offset(const ApplyBf16Args& a, const uint32_t* wpack, int64_t np, int64_t kp, int64_t k, int64_t lo,
                  int64_t hi, bool ident, bool first) {
  const PairList& pl = a.pairs;
  static const float zero[kCols] = {};
  for (int64_t p = lo; p < hi; p += kRows) {
    const int mr = int(hi - p < kRows ? hi - p : kRows);
    const uint16_t* arow[kRows];
    float* crow[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t q = p + (r < mr ? r : mr - 1);
      arow[r] = a.src + (ident ? q : int64_t(pl.col[q])) * a.kc;
      crow[r] = a.dst + (ident ? q : int64_t(pl.row[q])) * a.cols;
    }
    // The next tile's rows read (a gather: as apply_pairs in fused_kernels.h).
    const int64_t next_end = p + 2 * kRows < hi ? p + 2 * kRows : hi;
    for (int64_t q = p + kRows; q < next_end; ++q) {
      const uint16_t* row = a.src + (ident ? q : int64_t(pl.col[q])) * a.kc;
      for (int64_t i = 0; i < a.kc; i += 32) __builtin_prefetch(row + i);
    }
    for (int64_t j = 0; j < np; ++j) {
      float* c[kRows];
      for (int r = 0; r < kRows; ++r) c[r] = crow[r] + j * kCols;
      const int64_t ncols = a.cols - j * kCols < kCols ? a.cols - j * kCols : kCols;
      const float* init = first ? (a.bias ? a.bias + j * kCols : zero) : nullptr;
      micro(a.kc, kp, arow, wpack + (k * np + j) * kp * kCols, c, mr, ncols, init);
    }
  }
}

// As apply_blocks (fused_kernels.h): where the identity offset runs, it goes
// first and stores bias (or zero) + its products into every row of the
// block; else the rows start as the bias (or zero). Then every other offset.
void apply_impl(const ApplyBf16Args& a, const uint32_t* wpack, int64_t np, int64_t kp) {
  const int64_t K = a.pairs.kernel_volume, blocks = (a.num_rows + kBlockRows - 1) / kBlockRows;
  const PairList& pl = a.pairs;
  const int64_t ident = a.kc > 0 ? pl.identity : -1;
#pragma omp parallel for num_threads(a.nt) schedule(dynamic, 1) if (blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kBlockRows, r1 = r0 + kBlockRows < a.num_rows ? r0 + kBlockRows : a.num_rows;
    if (ident >= 0)
      apply_offset(a, wpack, np, kp, ident, r0, r1, true, true);
    else
      for (int64_t r = r0; r < r1; ++r) {
        float* d = a.dst + r * a.cols;
        if (a.bias)
          __builtin_memcpy(d, a.bias, sizeof(float) * static_cast<unsigned long>(a.cols));
        else
          __builtin_memset(d, 0, sizeof(float) * static_cast<unsigned long>(a.cols));
      }
    for (int64_t k = 0; k < (a.kc == 0 ? 0 : K); ++k)
      if (k != ident) apply_offset(a, wpack, np, kp, k, pl.cuts[blk * K + k], pl.cuts[(blk + 1) * K + k], false, false);
    if (a.relu)
      for (int64_t i = r0 * a.cols; i < r1 * a.cols; ++i) a.dst[i] = a.dst[i] < 0.0f ? 0.0f : a.dst[i];
  }
}

}  // namespace

void apply_bf16_kernels(const ApplyBf16Args& a, uint32_t* wpack, int64_t np, int64_t kp) {
  pack(a, wpack, np, kp);
  apply_impl(a, wpack, np, kp);
}

}  // namespace conv
}  // namespace ps
#pragma GCC pop_options
#define PS_CONV_HAVE_BF16 1
#endif

namespace ps {
namespace conv {

bool bf16_runs() {
#if defined(PS_CONV_HAVE_BF16)
  return avx512_bf16_runs();
#else
  return false;
#endif
}

void apply_bf16(const ApplyBf16Args& a) {
#if defined(PS_CONV_HAVE_BF16)
  const int64_t np = (a.cols + 31) / 32, kp = (a.kc + 1) / 2;
  std::vector<uint32_t> wpack(size_t(a.pairs.kernel_volume * np * kp * 32 > 0 ? a.pairs.kernel_volume * np * kp * 32 : 1));
  apply_bf16_kernels(a, wpack.data(), np, kp);
#else
  (void)a;
#endif
}

}  // namespace conv
}  // namespace ps
