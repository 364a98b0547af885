// Runtime dispatch of the vector-sparse convolution kernels (see sparse.h):
// the packed-weight and weight-gradient scratch is sized here for the build
// that runs.
#include "conv/sparse.h"

#include <algorithm>
#include <vector>

namespace ps {
namespace conv {
namespace {

Isa sparse_isa(Isa asked) { return asked != Isa::generic && isa_runs(Isa::avx2) ? Isa::avx2 : Isa::generic; }

template <typename T>
void apply_sparse_with(SparseApplyArgs<T> s, Isa asked) {
  const Isa isa = sparse_isa(asked);
  ApplyArgs<T>& a = s.base;
  const int64_t size = wpack_size<T>(isa, a.pairs.kernel_volume, a.kc, a.cols);
  std::vector<T> wpack(size_t(size > 0 ? size : 1));
  a.wpack = wpack.data();
  isa == Isa::avx2 ? avx2::apply_sparse(s) : generic::apply_sparse(s);
}

template <typename T>
void wgrad_masked_with(MaskedWgradArgs<T> m, Isa asked) {
  const Isa isa = sparse_isa(asked);
  WgradArgs<T>& a = m.base;
  std::vector<T> scratch(size_t(a.nt * wgrad_scratch<T>(isa, a.c_in, a.c_out)));
  a.scratch = scratch.data();
  isa == Isa::avx2 ? avx2::wgrad_masked(m) : generic::wgrad_masked(m);
}

}  // namespace

template <typename T>
void count_vectors(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose, int32_t* counts) {
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
      for (int64_t p = 0; p < np; ++p) {
        const int64_t n = std::min(NR, c_out - p * NR);
        bool nonzero = false;
        for (int64_t j = 0; j < n; ++j) nonzero |= row[p * NR + j] != T(0);
        mark[c * np + p] = nonzero;
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      int32_t n = 0;
      for (int64_t r = 0; r < rows; ++r) n += mark[r * np + p];
      counts[k * np + p] = n;
    }
  }
}
template void count_vectors<float>(const float*, int64_t, int64_t, int64_t, bool, int32_t*);
template void count_vectors<double>(const double*, int64_t, int64_t, int64_t, bool, int32_t*);

void apply_sparse(SparseApplyArgs<float> a, Isa isa) { apply_sparse_with(a, isa); }
void apply_sparse(SparseApplyArgs<double> a, Isa isa) { apply_sparse_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<float> a, Isa isa) { wgrad_masked_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<double> a, Isa isa) { wgrad_masked_with(a, isa); }

}  // namespace conv
}  // namespace ps
