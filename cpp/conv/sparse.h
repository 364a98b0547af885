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
// how many. `base.wpack` holds the packed listed rows in the same place the
// dense kernel packs all rows.
template <typename T>
struct SparseApplyArgs {
  ApplyArgs<T> base;
  int32_t* idx;    // scratch: K * panels(cols) * kc
  int32_t* count;  // scratch: K * panels(cols)
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

void apply_sparse(const SparseApplyArgs<float>& a, bool portable);
void apply_sparse(const SparseApplyArgs<double>& a, bool portable);
void wgrad_masked(const MaskedWgradArgs<float>& a, bool portable);
void wgrad_masked(const MaskedWgradArgs<double>& a, bool portable);

namespace avx2 {
void apply_sparse(const SparseApplyArgs<float>& a);
void apply_sparse(const SparseApplyArgs<double>& a);
void wgrad_masked(const MaskedWgradArgs<float>& a);
void wgrad_masked(const MaskedWgradArgs<double>& a);
}  // namespace avx2
namespace generic {
void apply_sparse(const SparseApplyArgs<float>& a);
void apply_sparse(const SparseApplyArgs<double>& a);
void wgrad_masked(const MaskedWgradArgs<float>& a);
void wgrad_masked(const MaskedWgradArgs<double>& a);
}  // namespace generic

}  // namespace conv
}  // namespace ps
