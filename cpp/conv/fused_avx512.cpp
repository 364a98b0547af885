// The fused convolution kernels compiled for AVX-512 (F, VL, BW, DQ) + FMA: 64-byte vectors,
// a taller register tile (fused.h), masked column tails; fused.cpp calls them
// only where isa_runs(Isa::avx512).
#include <omp.h>

#include <cstdint>

#include "conv/fused.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define PS_CONV_ISA Isa::avx512
#define PS_CONV_VEC_BYTES 64
namespace ps {
namespace conv {
namespace avx512 {
#include "conv/fused_kernels.h"
}  // namespace avx512
}  // namespace conv
}  // namespace ps
#pragma GCC pop_options
#else
namespace ps {
namespace conv {
namespace avx512 {
// Never called: isa_runs(Isa::avx512) is false in this build.
void apply(const ApplyArgs<float>& a) { generic::apply(a); }
void apply(const ApplyArgs<double>& a) { generic::apply(a); }
void wgrad(const WgradArgs<float>& a) { generic::wgrad(a); }
void wgrad(const WgradArgs<double>& a) { generic::wgrad(a); }
}  // namespace avx512
}  // namespace conv
}  // namespace ps
#endif
