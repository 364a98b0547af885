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
#include <memory>
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

// The vector-sparse lists (Bf16Execution in fused.h): per offset k and
// panel p of kBf16Panel columns (t = k * np16 + p) the listed pairs q in
// idx[t * kp ...], count[t] of them, start[t] the listed pairs before t. A
// pair is listed where its bits without the sign are not all zero (as
// `!= 0`: -0 is zero, NaN is not). keep[k]: offset k holds a nonzero.
// Reads the weight only (the choice needs no packing: pack_listed or the
// dense pack follows). Returns the listed vectors.
int64_t list_pairs(const ApplyBf16Args& a, int32_t* idx, int32_t* count, int64_t* start, uint8_t* keep,
                   int64_t np16, int64_t kp) {
  const int64_t K = a.pairs.kernel_volume;
  start[0] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* wk = a.w + k * a.kc * a.cols;
    int64_t in_offset = 0;
    for (int64_t p = 0; p < np16; ++p) {
      const int64_t t = k * np16 + p, j0 = p * kBf16Panel;
      const int64_t ncols = a.cols - j0 < kBf16Panel ? a.cols - j0 : kBf16Panel;
      int32_t n = 0;
      for (int64_t q = 0; q < kp; ++q) {
        const uint16_t* lo = wk + 2 * q * a.cols + j0;
        uint32_t bits = 0;  // or-ed whole, the sign masked once: the same as masking each value
        for (int64_t j = 0; j < ncols; ++j) bits |= lo[j];
        if (2 * q + 1 < a.kc)
          for (int64_t j = 0; j < ncols; ++j) bits |= lo[a.cols + j];
        if (bits & 0x7FFFu) idx[t * kp + n++] = int32_t(q);
      }
      count[t] = n;
      start[t + 1] = start[t] + n;
      in_offset += n;
    }
    keep[k] = in_offset > 0;
  }
  return start[K * np16];
}

// The listed pairs packed from wpack row start[t] on: kBf16Panel lanes of
// W_k[2q] | W_k[2q + 1] << 16 each (zero past the last column or channel).
void pack_listed(const ApplyBf16Args& a, uint32_t* wpack, const int32_t* idx, const int32_t* count,
                 const int64_t* start, int64_t np16, int64_t kp) {
  for (int64_t t = 0; t < a.pairs.kernel_volume * np16; ++t) {
    const int64_t k = t / np16, j0 = (t % np16) * kBf16Panel;
    const int64_t ncols = a.cols - j0 < kBf16Panel ? a.cols - j0 : kBf16Panel;
    for (int32_t i = 0; i < count[t]; ++i) {
      const int64_t q = idx[t * kp + i];
      const uint16_t* lo = a.w + (k * a.kc + 2 * q) * a.cols + j0;
      uint32_t* row = wpack + (start[t] + i) * kBf16Panel;
      for (int64_t j = 0; j < kBf16Panel; ++j) row[j] = j < ncols ? lo[j] : 0u;
      if (2 * q + 1 < a.kc)
        for (int64_t j = 0; j < ncols; ++j) row[j] |= uint32_t(lo[a.cols + j]) << 16;
    }
  }
}

// c[r][0:ncols] (+)= sum over the n listed pairs of x[r] pair q_i times
// B[i] (ncols <= kBf16Panel; init as micro_bf16's): micro_bf16's sums of
// one panel, the pairs not listed left out. The last pair of an odd kc (one
// channel: its row ends there) is taken after the loop, so that the loop
// reads each pair as one 32-bit word at a fixed offset from every row (no
// test per step: with it GCC recomputed and spilled the rows' addresses).
void micro_sparse(int64_t n, const int32_t* __restrict list, int64_t kc, const uint16_t* const* a,
                  const uint32_t* __restrict b, float* const* c, int mr, int64_t ncols, const float* init) {
  const __mmask16 m = __mmask16((1u << ncols) - 1u);
  const bool half = (kc & 1) && n > 0 && list[n - 1] == kc / 2;  // the pair (kc - 1, none)
  const int64_t whole = n - half;
  const char* row[kRows];
  __m512 acc[kRows];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    row[r] = reinterpret_cast<const char*>(a[r]);
    acc[r] = _mm512_maskz_loadu_ps(m, init ? init : c[r]);
  }
  for (int64_t i = 0; i < whole; ++i) {
    const int64_t off = int64_t(list[i]) * 4;
    const __m512bh w = (__m512bh)_mm512_loadu_si512(b + i * kBf16Panel);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      uint32_t v;
      __builtin_memcpy(&v, row[r] + off, 4);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(v)), w);
    }
  }
  if (half) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(b + whole * kBf16Panel);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(a[r][kc - 1])), w);
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
    if (r < mr) _mm512_mask_storeu_ps(c[r], m, acc[r]);
}

// apply_blocks with a tile of this kernel's (apply_dense's or
// apply_sparse's): offsets without a nonzero skipped; a block's first offset
// (the identity where it runs) stores bias or zero + its products; with
// dst_bf16, each block's rows are rounded into it once they are done (the
// sums in dst, or, with a.sums, in a block of the thread's own).
template <typename Tile>
void walk(const ApplyBf16Args& a, const uint8_t* keep, Tile tile) {
  const auto skip = [keep](int64_t k) { return keep[k] == 0; };
  if (a.dst_bf16 == nullptr) {
    apply_blocks<kRows>(a, skip, tile);
    return;
  }
  const auto round = [&a](int64_t r0, int64_t r1, const float* rows) {
    round_bf16(rows, a.dst_bf16 + r0 * a.cols, (r1 - r0) * a.cols);
  };
  if (a.sums)
    apply_blocks<kRows, true>(a, skip, tile, round);
  else
    apply_blocks<kRows>(a, skip, tile, round);
}

void apply_dense(const ApplyBf16Args& a, const uint32_t* wpack, const uint8_t* keep, int64_t np, int64_t kp) {
  static const float zero[kCols] = {};
  walk(a, keep, [&a, wpack, np, kp](int64_t k, const uint16_t* const* arow, float* const* crow, int mr,
                                    bool first) {
    for (int64_t j = 0; j < np; ++j) {
      float* c[kRows];
      for (int r = 0; r < kRows; ++r) c[r] = crow[r] + j * kCols;
      const int64_t ncols = a.cols - j * kCols < kCols ? a.cols - j * kCols : kCols;
      const float* init = first ? (a.bias ? a.bias + j * kCols : zero) : nullptr;
      micro_bf16(a.kc, kp, arow, wpack + (k * np + j) * kp * kCols, c, mr, ncols, init);
    }
  });
}

void apply_sparse(const ApplyBf16Args& a, const uint32_t* wpack, const int32_t* idx, const int32_t* count,
                  const int64_t* start, const uint8_t* keep, int64_t np16, int64_t kp) {
  static const float zero[kBf16Panel] = {};
  walk(a, keep, [&](int64_t k, const uint16_t* const* arow, float* const* crow, int mr, bool first) {
    for (int64_t j = 0; j < np16; ++j) {
      const int64_t t = k * np16 + j;
      if (count[t] == 0 && !first) continue;
      float* c[kRows];
      for (int r = 0; r < kRows; ++r) c[r] = crow[r] + j * kBf16Panel;
      const int64_t ncols = a.cols - j * kBf16Panel < kBf16Panel ? a.cols - j * kBf16Panel : kBf16Panel;
      const float* init = first ? (a.bias ? a.bias + j * kBf16Panel : zero) : nullptr;
      micro_sparse(count[t], idx + t * kp, a.kc, arow, wpack + start[t] * kBf16Panel, c, mr, ncols, init);
    }
  });
}

}  // namespace
}  // namespace bf16

Bf16Execution apply_bf16_kernels(ApplyBf16Args a) {
  const int64_t K = a.pairs.kernel_volume, kp = (a.kc + 1) / 2;
  const int64_t np = (a.cols + bf16::kCols - 1) / bf16::kCols, np16 = (a.cols + kBf16Panel - 1) / kBf16Panel;
  // Both packings hold at most K x kp x (np16 x kBf16Panel <= np x kCols)
  // lanes; neither buffer is zeroed: every lane (and list entry) read is
  // written first.
  const int64_t lanes = K * kp * np * bf16::kCols, lists = K * np16 * kp;
  std::unique_ptr<uint32_t[]> wpack(new uint32_t[size_t(lanes > 0 ? lanes : 1)]);
  std::unique_ptr<int32_t[]> idx(new int32_t[size_t(lists > 0 ? lists : 1)]);
  std::vector<int32_t> count(size_t(K * np16 + 1));
  std::vector<int64_t> start(size_t(K * np16 + 1));
  std::vector<uint8_t> keep(size_t(K + 1));
  // No dst: each thread sums its block in a block of its own (every row
  // is written before it is read).
  std::unique_ptr<float[]> sums;
  if (a.dst == nullptr) a.sums = aligned_scratch(sums, int64_t(a.nt) * bf16::scratch_rows(a) * a.cols);
  const int64_t listed = bf16::list_pairs(a, idx.get(), count.data(), start.data(), keep.data(), np16, kp);
  int64_t kept = 0;
  for (int64_t k = 0; k < K; ++k) kept += keep[k];
  const int64_t capacity = kept * kp * np16;
  // Exact in a double, as in choose_execution (sparse.cpp).
  const double density = capacity ? double(listed) / double(capacity) : 0.0;
  if (density <= a.vector_density) {
    bf16::pack_listed(a, wpack.get(), idx.get(), count.data(), start.data(), np16, kp);
    bf16::apply_sparse(a, wpack.get(), idx.get(), count.data(), start.data(), keep.data(), np16, kp);
    return Bf16Execution::vector;
  }
  bf16::pack(a, wpack.get(), np, kp);
  bf16::apply_dense(a, wpack.get(), keep.data(), np, kp);
  return kept < K ? Bf16Execution::offsets : Bf16Execution::dense;
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

Bf16Execution apply_bf16(const ApplyBf16Args& a) {
#if defined(PS_CONV_HAVE_BF16)
  return apply_bf16_kernels(a);
#else
  (void)a;
  return Bf16Execution::dense;
#endif
}

}  // namespace conv
}  // namespace ps
