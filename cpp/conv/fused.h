// The fused gather-GEMM-scatter convolution: no gathered buffer, no separate
// scatter. Register tiles of kMR pairs x (two vectors of columns) read their
// input rows straight from the feature matrix and add into their output rows.
//
// Pairs come as a PairList: per kernel offset k the pairs
// [ptr[k], ptr[k+1]) with `row` (the side written, strictly increasing within
// an offset) and `col` (the side read). The writer of row r is the thread that
// owns the block of rows containing r (blocks of kBlockRows, fixed), and every
// row adds its offsets' contributions in offset order, each contribution a
// fixed-order sum over the channels: results do not depend on the thread
// count, and no two threads ever write one row.
//
// Callers check every index and size first (ConvPlan in bind.cpp); the
// kernels trust them. Scratch is allocated here, outside the per-ISA builds
// (fused_kernels.h must not instantiate std templates, see spmm/kernels.h).
#pragma once

#include <cstdint>

namespace ps {
namespace conv {

struct PairList {
  const int32_t* row;  // written side, strictly increasing within an offset
  const int32_t* col;  // read side
  const int64_t* ptr;  // kernel_volume + 1
  // (blocks + 1, kernel_volume): cuts[b][k] = first pair of offset k whose
  // row is >= b * kBlockRows (blocks of the written rows).
  const int64_t* cuts;
  int64_t kernel_volume;
  // The identity offset of a submanifold map, or -1: its pairs (r, r) are not
  // in the lists (ptr[k] == ptr[k+1]); the kernels run it as a plain matmul
  // over contiguous rows, no indices read.
  int64_t identity;
};

// dst = bias + sum over offsets k of (dst[row] += src[col] @ B_k) with B_k =
// W[k] (transpose false; kc = C_in, cols = C_out) or W[k]^T (transpose true;
// kc = C_out, cols = C_in). W is (K, C_in, C_out) row-major; bias (cols) may
// be null (zero). Every row of dst is written.
template <typename T>
struct ApplyArgs {
  const T* src;   // (rows of the read side, kc)
  const T* w;     // (K, C_in, C_out)
  const T* bias;  // (cols) or null
  T* dst;         // (num_rows, cols)
  T* wpack;       // scratch: K * panels(cols) * kc * NR, filled here
  int64_t kc, cols, num_rows;
  bool transpose;
  PairList pairs;
  int nt;
};

// grad_w[k] = x[col]^T @ g[row] summed over the pairs of offset k (every
// k is written). Units are ranges of row blocks: units[u] .. units[u + 1] (fixed by
// the map and the channels, never by the thread count); each unit sums into
// its own partial (K, c_in, c_out) and the partials are added in unit order.
template <typename T>
struct WgradArgs {
  const T* x;        // (rows of the read side, c_in)
  const T* g;        // (num_rows, c_out)
  T* grad_w;         // (K, c_in, c_out)
  T* partials;       // scratch: num_units * K * c_in * c_out
  T* scratch;        // scratch: nt * wgrad_scratch(c_in, c_out)
  const int64_t* units;  // num_units + 1 row-block boundaries
  int64_t num_units, c_in, c_out, num_rows;
  PairList pairs;
  int nt;
};

constexpr int kMR = 6;               // pairs per register tile
constexpr int64_t kBlockRows = 256;  // written rows per work block
constexpr int64_t kUnitPairs = 65536;  // pairs per weight-gradient unit (at least, on large maps)
constexpr int64_t kMinUnits = 16;      // units a smaller map is cut into
constexpr int64_t kWgradBlocks = 2;    // row blocks per weight-gradient step
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // cap on all units' partials
constexpr int64_t kKC = 64;         // pairs per packed weight-gradient panel
constexpr int64_t kWC = 128;          // pairs per step of the unpacked weight gradient

// Columns per register tile: two 32-byte vectors.
template <typename T>
constexpr int64_t nr() { return 64 / int64_t(sizeof(T)); }
template <typename T>
constexpr int64_t panels(int64_t cols) { return (cols + nr<T>() - 1) / nr<T>(); }
template <typename T>
constexpr int64_t wpack_size(int64_t k, int64_t kc, int64_t cols) { return k * panels<T>(cols) * kc * nr<T>(); }
template <typename T>
constexpr int64_t wgrad_scratch(int64_t c_in, int64_t c_out) {
  return kMR * kKC + panels<T>(c_out) * nr<T>() * kKC;
}

// Entry points (runtime ISA dispatch in fused.cpp; `portable`: the generic
// kernels even where AVX2 runs, for tests).
void apply(const ApplyArgs<float>& a, bool portable);
void apply(const ApplyArgs<double>& a, bool portable);
void wgrad(const WgradArgs<float>& a, bool portable);
void wgrad(const WgradArgs<double>& a, bool portable);
bool have_avx2();   // the CPU and this build can run the AVX2 kernels
bool uses_avx2();   // have_avx2(), asked once

namespace avx2 {
void apply(const ApplyArgs<float>& a);
void apply(const ApplyArgs<double>& a);
void wgrad(const WgradArgs<float>& a);
void wgrad(const WgradArgs<double>& a);
}  // namespace avx2
namespace generic {
void apply(const ApplyArgs<float>& a);
void apply(const ApplyArgs<double>& a);
void wgrad(const WgradArgs<float>& a);
void wgrad(const WgradArgs<double>& a);
}  // namespace generic

}  // namespace conv
}  // namespace ps
