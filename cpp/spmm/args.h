// Arguments of the SpMM kernels (flat buffers, checked by bind.cpp before any
// call) and the entry points of each instruction-set build of kernels.h.
#pragma once

#include <cstdint>

namespace ps {
namespace spmm {

struct CsrArgs {
  const int64_t* row_ptr;  // (M+1)
  const void* col;         // (nnz) unsigned, col_bytes wide
  int col_bytes;
  const void* val;         // (nnz)
  bool f64;
  int64_t M, K, N;
  const void* X;           // (K, N)
  void* Y;                 // (M, N)
  int nt;
};

struct BsrArgs {
  const int64_t* block_ptr;  // (ceil(M/br)+1)
  const void* block_col;     // (nb) unsigned, col_bytes wide
  int col_bytes;
  const void* val;           // (nb, br, bc)
  bool f64;
  int64_t M, K, N, br, bc;
  const void* X;
  void* Y;
  int nt;
};

struct NmArgs {
  const uint8_t* positions;  // ceil(M*L*bits/8) bytes
  const void* val;           // (M, L)
  bool f64;
  int64_t M, K, N, L, n, m;
  int bits;
  const void* X;
  void* Y;
  int nt;
};

struct EieArgs {
  const int64_t* col_ptr;  // (P, K+1), local entry offsets per PE
  const uint8_t* rel_idx;  // sum_p ceil(E_p/2) bytes
  const void* val;         // (sum_p E_p)
  bool f64;
  int64_t M, K, N, P;
  const void* X;
  void* Y;
  int nt;
};

// One kernel offset of a sparse convolution with a CSR weight S = W[o]^T
// (C_out, C_in): out[out_idx[p], :] += S @ feats[in_idx[p], :] for every pair
// p. out_idx holds distinct rows (checked), so column blocks never collide.
struct CsrConvArgs {
  const int64_t* row_ptr;  // (C_out+1)
  const void* col;         // (nnz) unsigned, col_bytes wide, < C_in
  int col_bytes;
  const void* val;
  bool f64;
  int64_t C_out, C_in, P;
  const void* feats;       // (N_in, C_in)
  const int64_t* in_idx;   // (P)
  const int64_t* out_idx;  // (P), distinct
  void* out;               // (N_out, C_out), accumulated
  int nt;
};

#define PS_SPMM_DECLARE_ENTRY_POINTS \
  void csr(const CsrArgs& a);        \
  void csr_conv(const CsrConvArgs& a); \
  void bsr(const BsrArgs& a);        \
  void nm(const NmArgs& a);          \
  void eie(const EieArgs& a);

// One build per instruction set (isa_*.cpp); bind.cpp picks one that runs
// here (isa.h).
namespace generic { PS_SPMM_DECLARE_ENTRY_POINTS }
namespace avx2 { PS_SPMM_DECLARE_ENTRY_POINTS }
namespace avx512 { PS_SPMM_DECLARE_ENTRY_POINTS }

}  // namespace spmm
}  // namespace ps
