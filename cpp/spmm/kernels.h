// Sparse-weight x dense-activation kernels: Y (M, N) = S (M, K) @ X (K, N),
// X and Y row-major. The sparse operand comes in one of four layouts:
//
//   CSR  row_ptr (M+1) int64, col (nnz) unsigned 1/2/4/8 bytes, val (nnz)
//   BSR  block_ptr (MB+1) int64, block_col (nb) unsigned, val (nb, br, bc);
//        edge blocks may hang over M or K (the overhang is never read/written)
//   NM   val (M, L), positions packed LSB-first, `bits` per kept value; kept
//        value t of a row sits at column (t / n) * m + position
//   EIE  rows interleaved over P PEs (row r -> PE r % P, local row r / P); per
//        PE a CSC: col_ptr (P, K+1) int64 local entry offsets, 4-bit relative
//        row indices packed two per byte (low nibble first, each PE's array
//        starting on a byte), values; local row = previous + z + 1
//
// Work split: every task owns a disjoint block of Y (a row part x a column
// block of width kColBlock elements), so results do not depend on the thread
// count and no atomics are needed. Row parts hold equal numbers of nonzeros.
// Column blocks keep the X rows a task touches in L2 (cache blocking over the
// dense operand). The inner loops run over contiguous columns of X and Y so
// the compiler vectorises them.
//
// This header is compiled once per instruction set (isa_*.cpp): everything
// here has internal linkage so the copies never merge at link time.
#pragma once

#include <cstdint>

#include "spmm/args.h"

namespace ps {
namespace spmm {
namespace {

// Output columns per task: 256 bytes of a row (64 floats, 32 doubles; the
// includer may set PS_SPMM_COL_BLOCK_BYTES); a task's X panel is K x 256
// bytes (256 KiB for K = 1024), well inside L2.
#ifndef PS_SPMM_COL_BLOCK_BYTES
#define PS_SPMM_COL_BLOCK_BYTES 256
#endif
template <typename T>
constexpr int64_t col_block() { return PS_SPMM_COL_BLOCK_BYTES / int64_t(sizeof(T)); }
// Columns per register tile of the CSR micro-kernel: 8 vector accumulators
// (the includer sets PS_SPMM_TILE_BYTES to 8 x its vector width).
#ifndef PS_SPMM_TILE_BYTES
#define PS_SPMM_TILE_BYTES 128
#endif
template <typename T>
constexpr int64_t tile() { return PS_SPMM_TILE_BYTES / int64_t(sizeof(T)); }

// Copy X[:, j0:j0+w] into a contiguous (K, w) panel: the rows a task reads
// then sit w elements apart instead of N (fewer pages, no cache-set conflicts).
template <typename T>
inline void pack_panel(const T* __restrict X, int64_t K, int64_t N, int64_t j0, int64_t w,
                       T* __restrict panel) {
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict src = X + k * N + j0;
    T* __restrict dst = panel + k * w;
    for (int64_t j = 0; j < w; ++j) dst[j] = src[j];
  }
}

// A scratch array of int64 with internal linkage (no std templates here:
// their instantiations would merge across the per-ISA builds at link time).
struct Buffer {
  explicit Buffer(int64_t n) : data(new int64_t[n > 0 ? n : 1]()) {}
  ~Buffer() { delete[] data; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  int64_t& operator[](int64_t i) { return data[i]; }
  const int64_t& operator[](int64_t i) const { return data[i]; }
  int64_t* data;
};

// Split rows [0, rows) into `parts` ranges of equal work, work prefix `ptr`
// (ptr[0] = 0, ptr[rows] = total): b[0..parts] boundaries.
inline void split_rows(const int64_t* ptr, int64_t rows, int64_t parts, Buffer& b) {
  for (int64_t p = 0; p <= parts; ++p) b[p] = rows;
  b[0] = 0;
  const int64_t total = ptr[rows];
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    // Lower bound: first row whose prefix reaches the target.
    int64_t lo = r, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    r = lo;
    b[p] = r;
  }
}

// How many row parts: enough tasks for every thread (4 per thread) even when
// there are few column blocks, never more parts than rows.
inline int64_t row_parts(int64_t rows, int64_t col_blocks, int nt) {
  if (nt <= 1 || rows <= 1) return 1;
  int64_t parts = (4 * int64_t(nt) + col_blocks - 1) / col_blocks;
  if (parts < 1) parts = 1;
  return parts > rows ? rows : parts;
}

// The schedule the CSR, BSR and N:M kernels share: (row part x column block)
// tasks handed out dynamically; part p covers rows [bounds[p], bounds[p+1]).
// A wide X is packed into a contiguous (K, w) panel per column block, once per
// thread and block. body(row_begin, row_end, j0, w, src, ld) computes one task:
// output columns [j0, j0 + w), X's columns there at src with row stride ld.
template <typename T, typename Body>
inline void for_each_panel_task(const Buffer& bounds, int64_t parts, const T* X, int64_t K, int64_t N, int nt,
                                Body&& body) {
  constexpr int64_t CB = col_block<T>();
  const int64_t ncb = (N + CB - 1) / CB;
  const int64_t tasks = parts * ncb;
  // Pack X panels only when X rows are far apart; a narrow X is its own panel.
  const bool pack = N > CB && K > 0;
#pragma omp parallel num_threads(nt)
  {
    T* panel = pack ? new T[K * CB] : nullptr;
    int64_t packed = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t part = t % parts, cb = t / parts;
      const int64_t j0 = cb * CB, w = (j0 + CB < N ? j0 + CB : N) - j0;
      const T* src = X + j0;
      int64_t ld = N;
      if (pack) {
        if (packed != cb) pack_panel(X, K, N, j0, w, panel);
        packed = cb;
        src = panel;
        ld = w;
      }
      body(bounds[part], bounds[part + 1], j0, w, src, ld);
    }
    delete[] panel;
  }
}

// Entries ahead whose X rows are prefetched: the rows an entry reads are
// scattered, so the hardware prefetchers cannot guess them and every tile
// would wait on L2 latency (measured: 5x slower without it).
constexpr int64_t kPrefetch = 8;

template <typename T, int64_t W>
inline void prefetch_row(const T* p) {
  for (int64_t o = 0; o < W; o += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + o);
}

// Y[row, j0:j0+W] = sum_p val[p] * X[col[p], j0:j0+W] for one row and a
// register tile of compile-time width W; `limit` bounds the prefetch look-ahead.
template <typename T, typename I, int64_t W>
inline void csr_tile(const I* __restrict col, const T* __restrict val, int64_t begin, int64_t end,
                     int64_t limit, const T* __restrict X, int64_t ld, int64_t j0,
                     T* __restrict y) {
  T acc[W];
  for (int64_t j = 0; j < W; ++j) acc[j] = T(0);
  for (int64_t p = begin; p < end; ++p) {
    if (p + kPrefetch < limit) prefetch_row<T, W>(X + int64_t(col[p + kPrefetch]) * ld + j0);
    const T v = val[p];
    const T* __restrict x = X + int64_t(col[p]) * ld + j0;
    for (int64_t j = 0; j < W; ++j) acc[j] += v * x[j];
  }
  for (int64_t j = 0; j < W; ++j) y[j] = acc[j];
}

template <typename T, typename I>
inline void csr_rest(const I* __restrict col, const T* __restrict val, int64_t begin, int64_t end,
                     const T* __restrict X, int64_t N, int64_t j0, int64_t w, T* __restrict y) {
  for (int64_t j = 0; j < w; ++j) y[j] = T(0);
  for (int64_t p = begin; p < end; ++p) {
    const T v = val[p];
    const T* __restrict x = X + int64_t(col[p]) * N + j0;
    for (int64_t j = 0; j < w; ++j) y[j] += v * x[j];
  }
}

template <typename T, typename I>
void csr_kernel(const CsrArgs& a) {
  const int64_t* row_ptr = a.row_ptr;
  const I* col = static_cast<const I*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const T* X = static_cast<const T*>(a.X);
  T* Y = static_cast<T*>(a.Y);
  const int64_t M = a.M, K = a.K, N = a.N;
  if (M == 0 || N == 0) return;
  const int64_t nnz = row_ptr[M];
  constexpr int64_t CB = col_block<T>();
  constexpr int64_t W = tile<T>();
  const int64_t ncb = (N + CB - 1) / CB;
  const int64_t parts = row_parts(M, ncb, a.nt);
  Buffer bounds(parts + 1);
  split_rows(row_ptr, M, parts, bounds);
  for_each_panel_task<T>(bounds, parts, X, K, N, a.nt, [&](int64_t i0, int64_t i1, int64_t j0, int64_t w,
                                                            const T* src, int64_t ld) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t begin = row_ptr[i], end = row_ptr[i + 1];
        T* y = Y + i * N + j0;
        int64_t j = 0;
        for (; j + W <= w; j += W)
          csr_tile<T, I, W>(col, val, begin, end, nnz, src, ld, j, y + j);
        if (j < w) csr_rest<T, I>(col, val, begin, end, src, ld, j, w - j, y + j);
      }
  });
}

template <typename T, typename I>
void csr_conv_kernel(const CsrConvArgs& a) {
  const int64_t* row_ptr = a.row_ptr;
  const I* col = static_cast<const I*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const T* feats = static_cast<const T*>(a.feats);
  T* out = static_cast<T*>(a.out);
  const int64_t C_out = a.C_out, C_in = a.C_in, P = a.P;
  if (C_out == 0 || P == 0 || C_in == 0) return;
  const int64_t nnz = row_ptr[C_out];
  constexpr int64_t CB = col_block<T>();
  constexpr int64_t W = tile<T>();
  const int64_t ncb = (P + CB - 1) / CB;
#pragma omp parallel num_threads(a.nt)
  {
    T* panel = new T[C_in * CB];
    T* y = new T[CB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int64_t j0 = cb * CB, w = (j0 + CB < P ? j0 + CB : P) - j0;
      // Gather and transpose: panel[k, j] = feats[in_idx[j0 + j], k].
      for (int64_t j = 0; j < w; ++j) {
        const T* __restrict src = feats + a.in_idx[j0 + j] * C_in;
        for (int64_t k = 0; k < C_in; ++k) panel[k * w + j] = src[k];
      }
      for (int64_t i = 0; i < C_out; ++i) {
        const int64_t begin = row_ptr[i], end = row_ptr[i + 1];
        if (begin == end) continue;
        int64_t j = 0;
        for (; j + W <= w; j += W) csr_tile<T, I, W>(col, val, begin, end, nnz, panel, w, j, y + j);
        if (j < w) csr_rest<T, I>(col, val, begin, end, panel, w, j, w - j, y + j);
        for (int64_t q = 0; q < w; ++q) out[a.out_idx[j0 + q] * C_out + i] += y[q];
      }
    }
    delete[] y;
    delete[] panel;
  }
}

template <typename T, typename I>
void bsr_kernel(const BsrArgs& a) {
  const int64_t* block_ptr = a.block_ptr;
  const I* bcol = static_cast<const I*>(a.block_col);
  const T* val = static_cast<const T*>(a.val);
  const T* X = static_cast<const T*>(a.X);
  T* Y = static_cast<T*>(a.Y);
  const int64_t M = a.M, K = a.K, N = a.N, br = a.br, bc = a.bc;
  if (M == 0 || N == 0) return;
  const int64_t MB = (M + br - 1) / br;
  const int64_t nb = block_ptr[MB];
  constexpr int64_t CB = col_block<T>();
  const int64_t ncb = (N + CB - 1) / CB;
  const int64_t parts = row_parts(MB, ncb, a.nt);
  Buffer bounds(parts + 1);
  split_rows(block_ptr, MB, parts, bounds);
  for_each_panel_task<T>(bounds, parts, X, K, N, a.nt, [&](int64_t rb0, int64_t rb1, int64_t j0, int64_t w,
                                                            const T* src, int64_t ld) {
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int64_t r0 = rb * br, rows = (r0 + br < M ? r0 + br : M) - r0;
        for (int64_t r = 0; r < rows; ++r) {
          T* __restrict y = Y + (r0 + r) * N + j0;
          for (int64_t j = 0; j < w; ++j) y[j] = T(0);
        }
        for (int64_t b = block_ptr[rb]; b < block_ptr[rb + 1]; ++b) {
          if (b + 2 < nb) {
            const int64_t kn = int64_t(bcol[b + 2]) * bc;
            for (int64_t c = 0; c < bc && kn + c < K; ++c) prefetch_row<T, CB>(src + (kn + c) * ld);
          }
          const int64_t k0 = int64_t(bcol[b]) * bc, cols = (k0 + bc < K ? k0 + bc : K) - k0;
          const T* blk = val + b * br * bc;
          for (int64_t r = 0; r < rows; ++r) {
            T* __restrict y = Y + (r0 + r) * N + j0;
            for (int64_t c = 0; c < cols; ++c) {
              const T v = blk[r * bc + c];
              if (v == T(0)) continue;
              const T* __restrict x = src + (k0 + c) * ld;
              for (int64_t j = 0; j < w; ++j) y[j] += v * x[j];
            }
          }
        }
      }
  });
}

// Position of kept value `t` (global index) in a packed LSB-first bit stream.
inline int64_t nm_position(const uint8_t* packed, int64_t t, int bits) {
  if (bits == 0) return 0;
  const int64_t bit = t * bits;
  const int64_t byte = bit >> 3;
  const int shift = int(bit & 7);
  unsigned v = unsigned(packed[byte]) >> shift;
  if (shift + bits > 8) v |= unsigned(packed[byte + 1]) << (8 - shift);
  return int64_t(v & ((1u << bits) - 1u));
}

template <typename T>
void nm_kernel(const NmArgs& a) {
  const uint8_t* pos = a.positions;
  const T* val = static_cast<const T*>(a.val);
  const T* X = static_cast<const T*>(a.X);
  T* Y = static_cast<T*>(a.Y);
  const int64_t M = a.M, K = a.K, N = a.N, L = a.L, n = a.n, m = a.m;
  const int bits = a.bits;
  if (M == 0 || N == 0) return;
  constexpr int64_t CB = col_block<T>();
  constexpr int64_t W = tile<T>();
  const int64_t ncb = (N + CB - 1) / CB;
  // Every row holds L kept values: equal rows are equal work.
  const int64_t parts = row_parts(M, ncb, a.nt);
  Buffer bounds(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) bounds[p] = M * p / parts;
  for_each_panel_task<T>(bounds, parts, X, K, N, a.nt, [&](int64_t i0, int64_t i1, int64_t j0, int64_t w,
                                                            const T* src, int64_t ld) {
      // One row's columns, decoded once per row and task; then the CSR
      // register-tile micro-kernel runs on them.
      uint32_t* cols = new uint32_t[L > 0 ? L : 1];
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t q = 0; q < L; ++q)
          cols[q] = uint32_t((q / n) * m + nm_position(pos, i * L + q, bits));
        const T* v = val + i * L;
        T* y = Y + i * N + j0;
        int64_t j = 0;
        for (; j + W <= w; j += W) csr_tile<T, uint32_t, W>(cols, v, 0, L, L, src, ld, j, y + j);
        if (j < w) csr_rest<T, uint32_t>(cols, v, 0, L, src, ld, j, w - j, y + j);
      }
      delete[] cols;
  });
}

template <typename T>
void eie_kernel(const EieArgs& a) {
  const int64_t* col_ptr = a.col_ptr;  // (P, K+1)
  const uint8_t* rel = a.rel_idx;
  const T* val = static_cast<const T*>(a.val);
  const T* X = static_cast<const T*>(a.X);
  T* Y = static_cast<T*>(a.Y);
  const int64_t M = a.M, K = a.K, N = a.N, P = a.P;
  if (M == 0 || N == 0) return;
  // Entry and nibble-byte offsets of each PE's arrays.
  Buffer entry0(P + 1), byte0(P + 1);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = col_ptr[p * (K + 1) + K];
    entry0[p + 1] = entry0[p] + e;
    byte0[p + 1] = byte0[p] + (e + 1) / 2;
  }
  constexpr int64_t CB = col_block<T>();
  const int64_t ncb = (N + CB - 1) / CB;
  const int64_t tasks = P * ncb;  // each PE owns its rows: tasks never overlap
#pragma omp parallel for num_threads(a.nt) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t p = t % P, cb = t / P;
    const int64_t j0 = cb * CB, w = (j0 + CB < N ? j0 + CB : N) - j0;
    for (int64_t r = p; r < M; r += P) {
      T* __restrict y = Y + r * N + j0;
      for (int64_t j = 0; j < w; ++j) y[j] = T(0);
    }
    const int64_t* cp = col_ptr + p * (K + 1);
    const T* v = val + entry0[p];
    const uint8_t* z = rel + byte0[p];
    for (int64_t k = 0; k < K; ++k) {
      int64_t local = -1;
      const T* __restrict x = X + k * N + j0;
      for (int64_t e = cp[k]; e < cp[k + 1]; ++e) {
        const int64_t gap = (z[e >> 1] >> ((e & 1) * 4)) & 15;
        local += gap + 1;
        const T s = v[e];
        if (s == T(0)) continue;  // padding entry of a long gap
        T* __restrict y = Y + (local * P + p) * N + j0;
        for (int64_t j = 0; j < w; ++j) y[j] += s * x[j];
      }
    }
  }
}

template <typename T>
void csr_dispatch(const CsrArgs& a) {
  switch (a.col_bytes) {
    case 1: csr_kernel<T, uint8_t>(a); break;
    case 2: csr_kernel<T, uint16_t>(a); break;
    case 4: csr_kernel<T, uint32_t>(a); break;
    default: csr_kernel<T, uint64_t>(a); break;
  }
}

template <typename T>
void csr_conv_dispatch(const CsrConvArgs& a) {
  switch (a.col_bytes) {
    case 1: csr_conv_kernel<T, uint8_t>(a); break;
    case 2: csr_conv_kernel<T, uint16_t>(a); break;
    case 4: csr_conv_kernel<T, uint32_t>(a); break;
    default: csr_conv_kernel<T, uint64_t>(a); break;
  }
}

template <typename T>
void bsr_dispatch(const BsrArgs& a) {
  switch (a.col_bytes) {
    case 1: bsr_kernel<T, uint8_t>(a); break;
    case 2: bsr_kernel<T, uint16_t>(a); break;
    case 4: bsr_kernel<T, uint32_t>(a); break;
    default: bsr_kernel<T, uint64_t>(a); break;
  }
}

}  // namespace
}  // namespace spmm
}  // namespace ps

// Entry points of one instruction set, in namespace ps::spmm::PS_SPMM_ISA.
#define PS_SPMM_DEFINE_ENTRY_POINTS                                                     \
  void csr(const CsrArgs& a) {                                                          \
    if (a.f64) csr_dispatch<double>(a); else csr_dispatch<float>(a);                    \
  }                                                                                     \
  void csr_conv(const CsrConvArgs& a) {                                                 \
    if (a.f64) csr_conv_dispatch<double>(a); else csr_conv_dispatch<float>(a);          \
  }                                                                                     \
  void bsr(const BsrArgs& a) {                                                          \
    if (a.f64) bsr_dispatch<double>(a); else bsr_dispatch<float>(a);                    \
  }                                                                                     \
  void nm(const NmArgs& a) {                                                            \
    if (a.f64) nm_kernel<double>(a); else nm_kernel<float>(a);                          \
  }                                                                                     \
  void eie(const EieArgs& a) {                                                          \
    if (a.f64) eie_kernel<double>(a); else eie_kernel<float>(a);                        \
  }
