// The fused convolution kernels compiled for AVX2+FMA; fused.cpp calls them
// only when the CPU reports both at run time.
#include <omp.h>

#include <cstdint>

#include "conv/fused.h"
#include "conv/sparse.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define PS_CONV_HAVE_AVX2 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ps {
namespace conv {
namespace avx2 {
#include "conv/fused_kernels.h"
#include "conv/sparse_kernels.h"
}  // namespace avx2
}  // namespace conv
}  // namespace ps
#pragma GCC pop_options
#else
namespace ps {
namespace conv {
namespace avx2 {
// Never called: have_avx2() is false in this build.
void apply(const ApplyArgs<float>& a) { generic::apply(a); }
void apply(const ApplyArgs<double>& a) { generic::apply(a); }
void wgrad(const WgradArgs<float>& a) { generic::wgrad(a); }
void wgrad(const WgradArgs<double>& a) { generic::wgrad(a); }
void apply_sparse(const SparseApplyArgs<float>& a) { generic::apply_sparse(a); }
void apply_sparse(const SparseApplyArgs<double>& a) { generic::apply_sparse(a); }
void wgrad_masked(const MaskedWgradArgs<float>& a) { generic::wgrad_masked(a); }
void wgrad_masked(const MaskedWgradArgs<double>& a) { generic::wgrad_masked(a); }
}  // namespace avx2
}  // namespace conv
}  // namespace ps
#endif

namespace ps {
namespace conv {
bool have_avx2() {
#if defined(PS_CONV_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace conv
}  // namespace ps
