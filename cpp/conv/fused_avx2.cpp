// The fused convolution kernels compiled for AVX2+FMA; fused.cpp calls them
// only where isa_runs(Isa::avx2).
#include <omp.h>

#include <cstdint>

#include "conv/fused.h"
#include "conv/sparse.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PS_CONV_ISA Isa::avx2
#define PS_CONV_VEC_BYTES 32
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
// Never called: isa_runs(Isa::avx2) is false in this build.
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
