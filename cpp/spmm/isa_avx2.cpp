// The same SpMM kernels compiled for AVX2+FMA, used only when the CPU reports
// both at run time (bind.cpp); elsewhere the generic build runs.
#include <cstdint>
#include <cstring>
#include <vector>

#include "spmm/args.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define PS_SPMM_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PS_SPMM_TILE_BYTES 256
#include "spmm/kernels.h"
namespace ps {
namespace spmm {
namespace avx2 {
PS_SPMM_DEFINE_ENTRY_POINTS
}  // namespace avx2
}  // namespace spmm
}  // namespace ps
#pragma GCC pop_options
#else
namespace ps {
namespace spmm {
namespace avx2 {
// Never called: have_avx2() is false in this build.
void csr(const CsrArgs& a) { generic::csr(a); }
void csr_conv(const CsrConvArgs& a) { generic::csr_conv(a); }
void bsr(const BsrArgs& a) { generic::bsr(a); }
void nm(const NmArgs& a) { generic::nm(a); }
void eie(const EieArgs& a) { generic::eie(a); }
}  // namespace avx2
}  // namespace spmm
}  // namespace ps
#endif

namespace ps {
namespace spmm {
bool have_avx2() {
#if defined(PS_SPMM_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace spmm
}  // namespace ps
