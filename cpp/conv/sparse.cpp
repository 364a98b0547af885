// Runtime dispatch of the vector-sparse convolution kernels (see sparse.h):
// the packed-weight and weight-gradient scratch is sized here for the build
// that runs.
#include "conv/sparse.h"

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

void apply_sparse(SparseApplyArgs<float> a, Isa isa) { apply_sparse_with(a, isa); }
void apply_sparse(SparseApplyArgs<double> a, Isa isa) { apply_sparse_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<float> a, Isa isa) { wgrad_masked_with(a, isa); }
void wgrad_masked(MaskedWgradArgs<double> a, Isa isa) { wgrad_masked_with(a, isa); }

}  // namespace conv
}  // namespace ps
