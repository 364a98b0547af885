// The bf16 inference forward of the fused convolution (fused.h): the block
// walk of every apply kernel (apply_blocks and apply_pairs of
// fused_kernels.h, included here in the AVX-512 build's shape), with
// `vdpbf16ps`: per step a tile of 8 rows x 32 columns adds
// x[r][2q] * W[2q][j] + x[r][2q+1] * W[2q+1][j] into float32 accumulators
// (the products of two bf16 are exact in float32). Weights are packed per
// offset and 32-column panel as channel pairs (low half: the even channel).
// Where the CPU runs AMX-BF16, the same walk with `tdpbf16ps` on the tiles
// (namespace amx: Bf16Execution::tiles, chosen by tiles_width).
// Compiled only where GCC targets x86; dispatch asks bf16_runs() first.
#include <omp.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "conv/fused.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

#pragma GCC push_options
// The AMX tiles' intrinsics (run only where amx_bf16_runs()): GCC 11 on, x86-64
// only (its AMX header), and an assembler that knows the instructions
// (PS_AMX_ASSEMBLES, probed by CMakeLists.txt).
#if __GNUC__ >= 11 && defined(__x86_64__) && defined(PS_AMX_ASSEMBLES)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,amx-tile,amx-bf16")
#define PS_CONV_HAVE_AMX 1
#else
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")
#endif
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

// apply_blocks (tiles of MR rows) with a tile of this kernel's (apply_dense's,
// apply_sparse's or amx::apply's): offsets without a nonzero skipped; a block's first offset
// (the identity where it runs) stores bias or zero + its products; with
// dst_bf16, each block's rows are rounded into it once they are done (the
// sums in dst, or, with a.sums, in a block of the thread's own); the next
// block's rows fetched during this one (apply_blocks' kNext).
template <int MR = kRows, typename Tile, typename Finish = NoFinish, typename Leave = NoFinish>
void walk(const ApplyBf16Args& a, const uint8_t* keep, Tile tile, Finish finish = Finish(), Leave leave = Leave()) {
  const auto skip = [keep](int64_t k) { return keep[k] == 0; };
  if (a.dst_bf16 == nullptr) {
    apply_blocks<MR, false, false, false, true>(a, skip, tile, NoEpilogue(), finish, leave);
    return;
  }
  const auto round = [&a](int64_t r0, int64_t r1, const float* rows) {
    round_bf16(rows, a.dst_bf16 + r0 * a.cols, (r1 - r0) * a.cols);
  };
  if (a.sums)
    apply_blocks<MR, true, false, false, true>(a, skip, tile, round, finish, leave);
  else
    apply_blocks<MR, false, false, false, true>(a, skip, tile, round, finish, leave);
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

#if defined(PS_CONV_HAVE_AMX)
// The AMX form (Bf16Execution::tiles). Tile registers: 0-3 the sums of a
// tile (16 rows x 16 columns of float32 each), 4 the tile's rows (16 rows x
// kpa channel pairs), 5-7 the weight (kpa pairs x 16 columns, as the
// vdpbf16ps packing: a pair's two bf16 in one 32-bit lane): a step of four
// column groups loads the weight of groups 0-3 into 5, 6, 7 and 5 again.
namespace amx {

constexpr int kRows = 16;       // rows (pairs) a tile
constexpr int64_t kGroup = 16;  // columns a sums tile
constexpr int kSums = 4;        // sums tiles a pass over the channels

struct alignas(64) Config {  // the LDTILECFG operand, palette 1
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// kp channel pairs, in chunks of kpa (<= 16) pairs as even as they come
// (kp = 17: two chunks of 9), kpp = the chunks' pairs (>= kp: the last
// ones zero); ng column groups of kGroup; a gathered row holds kpp pairs
// (astride bf16).
struct Shape {
  int64_t kp, chunks, kpa, kpp, ng, astride;
  explicit Shape(const ApplyBf16Args& a)
      : kp((a.kc + 1) / 2),
        chunks(kp > 16 ? (kp + 15) / 16 : 1),
        kpa(kp > 0 ? (kp + chunks - 1) / chunks : 1),
        kpp(kpa * chunks),
        ng((a.cols + kGroup - 1) / kGroup),
        astride(2 * kpp) {}
};

Config config_of(const Shape& s) {
  Config c;
  __builtin_memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < kSums; ++t) {
    c.rows[t] = kRows;
    c.colsb[t] = uint16_t(kGroup * 4);
  }
  c.rows[4] = kRows;
  c.colsb[4] = uint16_t(s.kpa * 4);
  for (int t = 5; t < 8; ++t) {
    c.rows[t] = uint8_t(s.kpa);
    c.colsb[t] = uint16_t(kGroup * 4);
  }
  return c;
}

// wamx[k][g][q][j] = W_k[2q][16g + j] | W_k[2q + 1][16g + j] << 16 (zero
// past the last channel, pair or column), q < kpp.
void pack(const ApplyBf16Args& a, uint32_t* wamx, const Shape& s) {
  for (int64_t k = 0; k < a.pairs.kernel_volume; ++k) {
    const uint16_t* wk = a.w + k * a.kc * a.cols;
    for (int64_t g = 0; g < s.ng; ++g) {
      uint32_t* dst = wamx + (k * s.ng + g) * s.kpp * kGroup;
      for (int64_t q = 0; q < s.kpp; ++q)
        for (int64_t j = 0; j < kGroup; ++j) {
          const int64_t col = g * kGroup + j;
          uint32_t lo = 0, hi = 0;
          if (col < a.cols && q < s.kp) {
            lo = wk[2 * q * a.cols + col];
            if (2 * q + 1 < a.kc) hi = wk[(2 * q + 1) * a.cols + col];
          }
          dst[q * kGroup + j] = lo | hi << 16;
        }
    }
  }
}

// The sums of N column groups (N <= kSums) of a tile: rows `ab` (16 x
// astride bf16) times the groups' weights from `wg` on (kpp x 16 lanes a
// group), stored to cb (16 rows, ng * kGroup floats apart).
template <int N>
inline void products(const Shape& s, const uint16_t* ab, const uint32_t* wg, float* cb) {
  // GCC's tile loads are asm that names no memory operand: the barrier keeps
  // the gathered rows' stores (and any other) before them.
  asm volatile("" ::: "memory");
  const int64_t sa = s.astride * 2, sc = s.ng * kGroup * 4, gw = s.kpp * kGroup;
  _tile_zero(0);
  if (N > 1) _tile_zero(1);
  if (N > 2) _tile_zero(2);
  if (N > 3) _tile_zero(3);
  for (int64_t q = 0; q < s.kpp; q += s.kpa) {
    _tile_loadd(4, ab + 2 * q, sa);
    _tile_loadd(5, wg + q * kGroup, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (N > 1) {
      _tile_loadd(6, wg + gw + q * kGroup, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (N > 2) {
      _tile_loadd(7, wg + 2 * gw + q * kGroup, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (N > 3) {
      _tile_loadd(5, wg + 3 * gw + q * kGroup, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, cb, sc);
  if (N > 1) _tile_stored(1, cb + kGroup, sc);
  if (N > 2) _tile_stored(2, cb + 2 * kGroup, sc);
  if (N > 3) _tile_stored(3, cb + 3 * kGroup, sc);
  // And the sums' loads after the tile stores (add, even right after them
  // in finish): GCC 12's _tile_stored clobbers memory, headers before it
  // need not.
  asm volatile("" ::: "memory");
}

// A tile as the walk gave it: its offset, rows written, valid rows and
// whether it stores (a block's first offset).
struct Pending {
  float* crow[kRows];
  int64_t k;
  int mr;
  bool first;
};

// A thread's pipeline of three stages, so that no stage waits on the memory
// the one before it wrote (the tiles load and store through memory, which
// the vector loads and stores do not forward to them): tile i's rows are
// gathered into ab[i % 2] when the walk gives it; its products run when
// tile i + 1 comes, into cb[i % 2]; its sums are added to its rows when
// tile i + 2 comes, or when the block ends (finish). The rows are added in
// the walk's order: each row's sums are those of the unpipelined order.
// A call's pipes are its own (one a thread): each thread loads the tile
// configuration at its first tile (another library may have loaded its own
// on the thread since the last call) and gives the tiles back when it
// leaves the walk.
struct alignas(64) Pipe {
  uint16_t* ab[2];  // 16 rows of astride bf16 each (zero past kc)
  float* cb[2];     // 16 rows of ng * kGroup floats each
  Pending tile[3];
  int64_t n;        // tiles taken in the thread's current block
  bool configured;  // the tile configuration loaded
};

struct Amx {
  const ApplyBf16Args& a;
  const Shape& s;
  const uint32_t* wamx;

  void gather(Pipe& p, const uint16_t* const* arow, int mr) const {
    uint16_t* ab = p.ab[p.n & 1];
    for (int r = 0; r < mr; ++r)  // rows past mr keep what they held: their sums are never added
      for (int64_t i = 0; i < a.kc; i += 32) {
        const int n = int(a.kc - i < 32 ? a.kc - i : 32);
        const __mmask32 m = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1u;
        _mm512_mask_storeu_epi16(ab + r * s.astride + i, m, _mm512_maskz_loadu_epi16(m, arow[r] + i));
      }
  }

  // Tile i's products (its rows gathered in ab[i % 2]) into cb[i % 2].
  void multiply(Pipe& p, int64_t i) const {
    const uint16_t* ab = p.ab[i & 1];
    float* cb = p.cb[i & 1];
    const uint32_t* wk = wamx + p.tile[i % 3].k * s.ng * s.kpp * kGroup;
    for (int64_t g0 = 0; g0 < s.ng; g0 += kSums) {
      const int n = int(s.ng - g0 < kSums ? s.ng - g0 : kSums);
      const uint32_t* wg = wk + g0 * s.kpp * kGroup;
      if (n == 4)
        products<4>(s, ab, wg, cb + g0 * kGroup);
      else if (n == 3)
        products<3>(s, ab, wg, cb + g0 * kGroup);
      else if (n == 2)
        products<2>(s, ab, wg, cb + g0 * kGroup);
      else
        products<1>(s, ab, wg, cb + g0 * kGroup);
    }
  }

  // Tile i's sums (cb[i % 2]) added to its rows (stored over bias or zero
  // where it is a block's first offset).
  void add(Pipe& p, int64_t i) const {
    static const float zero[kGroup] = {};
    const Pending& t = p.tile[i % 3];
    const float* cb = p.cb[i & 1];
    for (int r = 0; r < t.mr; ++r)
      for (int64_t g = 0; g < s.ng; ++g) {
        const int64_t col = g * kGroup, nc = a.cols - col < kGroup ? a.cols - col : kGroup;
        const __mmask16 m = __mmask16((1u << nc) - 1u);
        const float* base = t.first ? (a.bias ? a.bias + col : zero) : t.crow[r] + col;
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, base), _mm512_loadu_ps(cb + r * s.ng * kGroup + col));
        _mm512_mask_storeu_ps(t.crow[r] + col, m, v);
      }
  }

  void take(Pipe& p, int64_t k, const uint16_t* const* arow, float* const* crow, int mr, bool first) const {
    Pending& t = p.tile[p.n % 3];
    for (int r = 0; r < kRows; ++r) t.crow[r] = crow[r];
    t.k = k;
    t.mr = mr;
    t.first = first;
    gather(p, arow, mr);
    if (p.n >= 1) multiply(p, p.n - 1);
    if (p.n >= 2) add(p, p.n - 2);
    ++p.n;
  }

  void finish(Pipe& p) const {
    if (p.n >= 1) multiply(p, p.n - 1);
    if (p.n >= 2) add(p, p.n - 2);
    if (p.n >= 1) add(p, p.n - 1);
    p.n = 0;
  }
};

// pipes: one a thread, their buffers set, n = 0, not configured (run).
void apply(const ApplyBf16Args& a, const uint32_t* wamx, const uint8_t* keep, const Shape& s, Pipe* pipes) {
  const Config cfg = config_of(s);
  const Amx amx{a, s, wamx};
  walk<kRows>(
      a, keep,
      [&](int64_t k, const uint16_t* const* arow, float* const* crow, int mr, bool first) {
        Pipe& p = pipes[omp_get_thread_num()];
        if (!p.configured) {
          _tile_loadconfig(&cfg);
          p.configured = true;
        }
        amx.take(p, k, arow, crow, mr, first);
      },
      [&]() { amx.finish(pipes[omp_get_thread_num()]); },
      [&]() {
        if (pipes[omp_get_thread_num()].configured) _tile_release();
      });
}

// The AMX form of apply_bf16 (offsets with keep[k] == 0 skipped): the
// weight packed, each thread's pipe and buffers set, the walk.
void run(const ApplyBf16Args& a, const uint8_t* keep) {
  const Shape s(a);
  std::unique_ptr<uint32_t[]> wamx(new uint32_t[size_t(a.pairs.kernel_volume * s.ng * s.kpp * kGroup + 1)]);
  pack(a, wamx.get(), s);
  // Per thread two blocks of gathered rows (zero: the channels past kc
  // stay zero) and two of sums.
  const int64_t arows = kRows * s.astride, crows = kRows * s.ng * kGroup;
  std::unique_ptr<uint16_t[]> abuf_owner;
  std::unique_ptr<float[]> cbuf_owner;
  uint16_t* abuf = aligned_scratch(abuf_owner, 2 * a.nt * arows);
  __builtin_memset(abuf, 0, sizeof(uint16_t) * size_t(2 * a.nt * arows));
  float* cbuf = aligned_scratch(cbuf_owner, 2 * a.nt * crows);
  std::unique_ptr<Pipe[]> pipes(new Pipe[size_t(a.nt)]);
  for (int t = 0; t < a.nt; ++t) {
    Pipe& p = pipes[size_t(t)];
    p.ab[0] = abuf + 2 * t * arows;
    p.ab[1] = p.ab[0] + arows;
    p.cb[0] = cbuf + 2 * t * crows;
    p.cb[1] = p.cb[0] + crows;
    p.n = 0;
    p.configured = false;
  }
  apply(a, wamx.get(), keep, s, pipes.get());
}

}  // namespace amx
#endif

}  // namespace
}  // namespace bf16

Bf16Execution apply_bf16_kernels(ApplyBf16Args a) {
  const int64_t K = a.pairs.kernel_volume, kp = (a.kc + 1) / 2;
  const int64_t np = (a.cols + bf16::kCols - 1) / bf16::kCols, np16 = (a.cols + kBf16Panel - 1) / kBf16Panel;
  // Neither the lists nor (below) the packing is zeroed: every entry read
  // is written first.
  const int64_t lists = K * np16 * kp;
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
#if defined(PS_CONV_HAVE_AMX)
  if (capacity > 0 && density * __builtin_sqrt(double(a.kc) * double(a.cols)) >= a.tiles_width &&
      amx_bf16_runs()) {  // (PS_CONV_HAVE_AMX: the build has the tiles)
    bf16::amx::run(a, keep.data());
    return Bf16Execution::tiles;
  }
#endif
  // Both packings hold at most K x kp x (np16 x kBf16Panel <= np x kCols)
  // lanes.
  const int64_t lanes = K * kp * np * bf16::kCols;
  std::unique_ptr<uint32_t[]> wpack(new uint32_t[size_t(lanes > 0 ? lanes : 1)]);
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

bool bf16_tiles_run() {
#if defined(PS_CONV_HAVE_BF16) && defined(PS_CONV_HAVE_AMX)
  return avx512_bf16_runs() && amx_bf16_runs();
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
