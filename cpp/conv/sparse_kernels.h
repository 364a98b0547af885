// Vector-sparse kernels (see sparse.h), compiled for the 32-byte builds
// (AVX2 and generic): each of those translation units includes this right
// after fused_kernels.h, and these reuse its helpers (Vec, vload, vstore,
// lanes, nr, panels, tile_step, tile_load, tile_store, tile_add,
// prefetch_row) and its tile shape kMR. Same rules: internal linkage, no
// std templates. The listed rows are packed before (pack_sparse,
// sparse.cpp), in panels of nr<T>() columns.

#include "conv/sparse_walk.h"

namespace {

static_assert(nr<float>() == sparse_panel<float>() && nr<double>() == sparse_panel<double>(),
              "the 32-byte builds' tiles are the sparse panels");

// C[r][0:ncols] += sum_i A[r][idx[i]] * B[i][0:NR] for r < mr, B packed (n,
// NR), summed from C[r] in i order: micro<T, 1, true> over the listed rows
// (`init` as there; a panel of at most one vector's columns, such as C_out = 8
// or the last panel of 24, in one-vector tiles).
template <typename T>
inline void micro_idx(int64_t n, const int32_t* __restrict idx, const T* const* a, const T* __restrict b,
                      T* const* c, int mr, int64_t ncols, const T* init) {
  micro_cols<T, true>(n, [idx](int64_t i) { return int64_t(idx[i]); }, a, b, c, mr, ncols, init);
}

// The shared walk (sparse_walk.h) in the 32-byte builds' 6 x 16 tiles, full
// tiles of whole panels through tile_panels_full (fused_kernels.h).
template <typename T, bool kScratch>
void apply_sparse_impl(const SparseApplyArgs<T>& s) {
  const ApplyArgs<T>& a = s.base;
  const int64_t np = panels<T>(a.cols);
  const auto micro = [](auto... args) { micro_idx<T>(args...); };
  // Whole panels through tile_panels_full; a last panel of one vector (C_out
  // = 8 or 24) or less through micro_idx, every tile: at C = 8 with 75% of
  // the vectors pruned (some two listed rows a panel) tile_panels_full's
  // one-vector panel took 5% more instructions (bench/conv_instructions.py).
  if (a.cols % nr<T>() != 0) {
    walk_listed_panels<kMR, nr<T>(), kScratch>(s, micro, [](auto...) { return false; });
    return;
  }
  walk_listed_panels<kMR, nr<T>(), kScratch>(s, micro,
                                   [&a, np](const int32_t* count, const int32_t* idx, const int64_t* start,
                                            const T* const* arow, T* const* crow, bool first) {
                                     const int64_t kc = a.kc;
                                     tile_panels_full<T, false>(
                                         np, [count](int64_t j) { return int64_t(count[j]); },
                                         [idx, kc](int64_t j) {
                                           const int32_t* __restrict id = idx + j * kc;
                                           return [id](int64_t i) { return int64_t(id[i]); };
                                         },
                                         [&a, start](int64_t j) { return a.wpack + start[j] * nr<T>(); }, arow, crow,
                                         a.bias, first);
                                     return true;
                                   });
}

}  // namespace

void apply_sparse(const SparseApplyArgs<float>& a) { apply_sparse_either(a); }
void apply_sparse(const SparseApplyArgs<double>& a) { apply_sparse_either(a); }

#include "conv/sparse_wgrad.h"
