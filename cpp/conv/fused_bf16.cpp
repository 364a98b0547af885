// The bf16 inference forward of the fused convolution (fused.h): the block
// walk of every apply kernel (apply_blocks and apply_pairs of
// fused_kernels.h, included here in the AVX-512 build's shape), with
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
#define PS_CONV_ISA Isa::avx512
#define PS_CONV_VEC_BYTES 64
#define PS_CONV_KERNELS_ONLY  // only the block walk is borrowed
namespace ps {
namespace conv {
namespace bf16 {
#include "conv/fused_kernels.h"

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
void micro_bf16(int64_t kc, int64_t kp, const uint16_t* const* a, const uint32_t* b, float* const* c, int mr,
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

// dst[i] = round(src[i]) to bf16 for i < n: to nearest even, NaN as 0xFFFF
// (torch's CPU float -> bfloat16, whose vectorised conversion writes NaN so:
// the result equals dst.to(torch.bfloat16) bit for bit).
void round_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    __builtin_memcpy(&b, src + i, 4);
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = nan ? uint16_t(0xFFFF) : uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}

// apply_blocks with this kernel's tiles: a block's first offset (the
// identity where it runs) stores bias or zero + its products; with
// dst_bf16, each block's rows are rounded into it once they are done.
void apply_impl(const ApplyBf16Args& a, const uint32_t* wpack, int64_t np, int64_t kp) {
  static const float zero[kCols] = {};
  const auto tile = [&a, wpack, np, kp](int64_t k, const uint16_t* const* arow, float* const* crow, int mr,
                                         bool first) {
    for (int64_t j = 0; j < np; ++j) {
      float* c[kRows];
      for (int r = 0; r < kRows; ++r) c[r] = crow[r] + j * kCols;
      const int64_t ncols = a.cols - j * kCols < kCols ? a.cols - j * kCols : kCols;
      const float* init = first ? (a.bias ? a.bias + j * kCols : zero) : nullptr;
      micro_bf16(a.kc, kp, arow, wpack + (k * np + j) * kp * kCols, c, mr, ncols, init);
    }
  };
  const auto skip_none = [](int64_t) { return false; };
  if (a.dst_bf16 == nullptr) {
    apply_blocks<kRows>(a, skip_none, tile);
    return;
  }
  apply_blocks<kRows>(a, skip_none, tile, [&a](int64_t r0, int64_t r1) {
    round_bf16(a.dst + r0 * a.cols, a.dst_bf16 + r0 * a.cols, (r1 - r0) * a.cols);
  });
}

}  // namespace
}  // namespace bf16

void apply_bf16_kernels(const ApplyBf16Args& a, uint32_t* wpack, int64_t np, int64_t kp) {
  bf16::pack(a, wpack, np, kp);
  bf16::apply_impl(a, wpack, np, kp);
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
