// The same SpMM kernels compiled for AVX-512 (F, VL, BW, DQ) + FMA with
// 512-bit vectors preferred and wider tiles, used only where
// isa_runs(Isa::avx512) (bind.cpp).
#include <cstdint>
#include <cstring>
#include <vector>

#include "spmm/args.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define PS_SPMM_TILE_BYTES 512
#define PS_SPMM_COL_BLOCK_BYTES 512
#include "spmm/kernels.h"
namespace ps {
namespace spmm {
namespace avx512 {
PS_SPMM_DEFINE_ENTRY_POINTS
}  // namespace avx512
}  // namespace spmm
}  // namespace ps
#pragma GCC pop_options
#else
namespace ps {
namespace spmm {
namespace avx512 {
// Never called: isa_runs(Isa::avx512) is false in this build.
void csr(const CsrArgs& a) { generic::csr(a); }
void csr_conv(const CsrConvArgs& a) { generic::csr_conv(a); }
void bsr(const BsrArgs& a) { generic::bsr(a); }
void nm(const NmArgs& a) { generic::nm(a); }
void eie(const EieArgs& a) { generic::eie(a); }
}  // namespace avx512
}  // namespace spmm
}  // namespace ps
#endif
