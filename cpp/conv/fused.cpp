// Runtime dispatch of the fused convolution kernels (see fused.h).
#include "conv/fused.h"

namespace ps {
namespace conv {
namespace {
bool use_avx2() {
  static const bool yes = have_avx2();
  return yes;
}
}  // namespace

bool uses_avx2() { return use_avx2(); }
void apply(const ApplyArgs<float>& a, bool portable) { !portable && use_avx2() ? avx2::apply(a) : generic::apply(a); }
void apply(const ApplyArgs<double>& a, bool portable) { !portable && use_avx2() ? avx2::apply(a) : generic::apply(a); }
void wgrad(const WgradArgs<float>& a, bool portable) { !portable && use_avx2() ? avx2::wgrad(a) : generic::wgrad(a); }
void wgrad(const WgradArgs<double>& a, bool portable) {
  !portable && use_avx2() ? avx2::wgrad(a) : generic::wgrad(a);
}

}  // namespace conv
}  // namespace ps
