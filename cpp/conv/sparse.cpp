// Runtime dispatch of the vector-sparse convolution kernels (see sparse.h).
#include "conv/sparse.h"

namespace ps {
namespace conv {

void apply_sparse(const SparseApplyArgs<float>& a, bool portable) {
  !portable && uses_avx2() ? avx2::apply_sparse(a) : generic::apply_sparse(a);
}
void apply_sparse(const SparseApplyArgs<double>& a, bool portable) {
  !portable && uses_avx2() ? avx2::apply_sparse(a) : generic::apply_sparse(a);
}
void wgrad_masked(const MaskedWgradArgs<float>& a, bool portable) {
  !portable && uses_avx2() ? avx2::wgrad_masked(a) : generic::wgrad_masked(a);
}
void wgrad_masked(const MaskedWgradArgs<double>& a, bool portable) {
  !portable && uses_avx2() ? avx2::wgrad_masked(a) : generic::wgrad_masked(a);
}

}  // namespace conv
}  // namespace ps
