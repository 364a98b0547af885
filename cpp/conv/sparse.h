// Vector-sparse forms of the fused convolution kernels (sparse_kernels.h).
//
// A weight panel is one offset's rows restricted to one register tile's
// columns (nr<T>() columns, the last panel zero-padded). A row of a panel is
// a "vector"; the sparse kernels pack only the vectors that hold a nonzero
// and let the inner loop visit only those: C[r][panel] += sum over listed
// rows c of A[r][c] * B_k[c][panel]. The lists are built from the values
// (apply: the weight itself; wgrad: the mask), so nothing but the weight and
// the pairs is needed, and the result equals the dense kernel's on the same
// weight (a skipped row adds exact zeros there).
#pragma once

#include <cstdint>

#include "conv/fused.h"

namespace ps {
namespace conv {

// The dense arguments plus scratch for the lists: idx[(k * panels + p) * kc
// + i] is the i-th listed row of panel p of offset k, count[k * panels + p]
// how many. `base.wpack` holds the packed listed rows, panel after panel
// with nothing between them (sparse_panel<T>() columns each; panel t's
// first row is row start[t] of wpack, start[K * panels] rows in all); the
// dispatch allocates and fills it, the lists and start. Panels are the 32-byte builds' tiles (sparse_panel<T>()
// columns) on every CPU and in every build, so one pruning granularity
// serves every machine.
template <typename T>
struct SparseApplyArgs {
  ApplyArgs<T> base;
  int32_t* idx;    // scratch: K * panels(cols) * kc
  int32_t* count;  // scratch: K * panels(cols)
  int64_t* start;  // scratch: K * panels(cols) + 1
  // scratch: K * panels(cols), or null. twin[k * panels + p] = 1 where panels
  // p and p + 1 of offset k are both whole (sparse_panel<T>() columns) and
  // list the same rows: the avx512 build runs such a pair in tiles of two
  // vectors a row, as its dense tiles (pack_sparse fills it).
  uint8_t* twin = nullptr;
};

// grad_w[k][c][j] for the vectors (k, c, panel of j) where mask holds a
// nonzero; every other entry of grad_w is zero. An entry computed is
// bit-identical to the dense wgrad's (same pairs, same order); entries
// inside a computed vector are not multiplied by the mask here.
template <typename T>
struct MaskedWgradArgs {
  WgradArgs<T> base;
  const T* mask;   // (K, c_in, c_out)
  int32_t* idx;    // scratch: K * panels(c_out) * c_in
  int32_t* count;  // scratch: K * panels(c_out)
};

// Columns of one panel (a vector) of the sparse kernels: the 32-byte
// builds' tile width (16 floats, 8 doubles).
template <typename T>
constexpr int64_t sparse_panel() { return nr<T>(Isa::avx2); }

// counts[k * panels + p]: the rows c of W[k] (W[k].T when transpose) holding
// a nonzero in the columns of panel p (sparse_panel<T>() columns): the vectors
// the vector-sparse kernels visit; panels = panels<T>(Isa::avx2, C_out, or
// C_in when transpose). One pass over the weight (K, c_in, c_out).
// twins (optional, K * panels): twins[k * panels + p] = 1 where panels p and
// p + 1 of offset k are both whole and list the same rows and p is not the
// second panel of an earlier such pair: the pairs the avx512 build runs in
// two-vector tiles (SparseApplyArgs::twin, taken from panel 0 on).
template <typename T>
void count_vectors(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose, int32_t* counts,
                   uint8_t* twins = nullptr);

// The engine's choice for one product of W (nn/_engine.py's `_execution`,
// made here in one pass so that a conv call pays microseconds for it):
// keep[k] = offset k holds a nonzero and (region null or region[k]);
// density = the kept offsets' listed vectors / (kept offsets x rows x
// panels), 0 with none kept (rows: c_out when transpose, else c_in);
// vector = density <= threshold; all_kept = every keep[k] is 1. With
// twin_threshold >= 0 the threshold moves toward it by the share of the
// kept offsets' listed vectors that sit in twin panels (count_vectors'
// twins): threshold + (twin_threshold - threshold) * twinned / listed.
struct Execution {
  bool all_kept;
  bool vector;
  double density;
};
template <typename T>
Execution choose_execution(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose,
                           const uint8_t* region, double threshold, uint8_t* keep, double twin_threshold = -1.0);

// `isa`: the build asked for. apply_sparse runs the avx512 build where it is
// asked and there are at least 128 output columns (one 64-byte vector per
// panel, sparse_avx512.cpp; measured slower below, see sparse.cpp), else the AVX2
// build wherever the CPU has it unless the generic one is asked for;
// wgrad_masked the avx512 build where it is asked on a CPU whose 512-bit
// FMAs run at full width (avx512_full_width(): Intel, AMD Zen 5; its 8 x 32 tiles,
// lists per 32 columns, masked halves zeroed after: sparse_wgrad.h), else the
// AVX2 build wherever it runs unless generic is asked. On an Intel Xeon
// (bench/masked_wgrad.py, KITTI sweep, one thread, C = 32 / 64 / 128) the
// avx512 masked gradient ran 1.00-1.13x the dense one at 50% of the
// vectors masked (avx2's 0.93-1.01x), 1.32-2.09x at 75% of twin vectors
// (avx2's 1.18-1.66x), as fast as avx2 at 75% of one-panel vectors.
void apply_sparse(SparseApplyArgs<float> a, Isa isa);
void apply_sparse(SparseApplyArgs<double> a, Isa isa);
void wgrad_masked(MaskedWgradArgs<float> a, Isa isa);
void wgrad_masked(MaskedWgradArgs<double> a, Isa isa);

#define PS_CONV_DECLARE_SPARSE                           \
  void apply_sparse(const SparseApplyArgs<float>& a);  \
  void apply_sparse(const SparseApplyArgs<double>& a); \
  void wgrad_masked(const MaskedWgradArgs<float>& a);  \
  void wgrad_masked(const MaskedWgradArgs<double>& a);
namespace avx2 { PS_CONV_DECLARE_SPARSE }
namespace generic { PS_CONV_DECLARE_SPARSE }
#undef PS_CONV_DECLARE_SPARSE
namespace avx512 {
void apply_sparse(const SparseApplyArgs<float>& a);
void apply_sparse(const SparseApplyArgs<double>& a);
void wgrad_masked(const MaskedWgradArgs<float>& a);
void wgrad_masked(const MaskedWgradArgs<double>& a);
}  // namespace avx512

}  // namespace conv
}  // namespace ps
