// The block walk of the vector-sparse forward, shared by every build's
// kernel (sparse_kernels.h for the 32-byte builds, sparse_avx512.cpp): each
// build's translation unit includes this inside its own namespace, after
// fused_kernels.h (apply_blocks), and passes its tile height MR, its panel
// width NR (sparse_panel<T>() columns in every build) and its micro-kernel.
// Same rules as fused_kernels.h: internal linkage, no std templates.

namespace {

// apply_blocks over the listed rows only: per offset k and panel j, micro(n,
// idx, a, b, c, mr, ncols, init) adds sum_i A[r][idx[i]] * B[i][0:ncols]
// into C's panel (n listed rows, B packed (n, NR) by pack_sparse); an offset
// whose panels list nothing is not visited, and a block's first offset
// stores bias (or zero) + its products into every panel, listed or not.
// `full(count, idx, start, arow, crow, first)` may take a tile across
// every panel of offset k instead (count, idx, start: offset k's; rows past
// mr repeat a valid one), the same sums: it returns false where it does
// not, and the panels then go through `micro` one by one.
// kScratch: as apply_blocks'.
template <int MR, int64_t NR, bool kScratch, typename T, typename Micro, typename Full>
void walk_listed_panels(const SparseApplyArgs<T>& s, Micro micro, Full full) {
  const ApplyArgs<T>& a = s.base;
  const int64_t np = (a.cols + NR - 1) / NR;
  const auto none_listed = [&s, np](int64_t k) {
    for (int64_t j = 0; j < np; ++j)
      if (s.count[k * np + j]) return false;
    return true;
  };
  const T zero[NR] = {};
  const auto tile = [&s, &a, &zero, &micro, &full, np](int64_t k, const T* const* arow, T* const* crow, int mr,
                                                       bool first) {
    const int32_t* count = s.count + k * np;
    if (full(count, s.idx + k * np * a.kc, s.start + k * np, arow, crow, first)) return;
    for (int64_t j = 0; j < np; ++j) {
      if (count[j] == 0 && !first) continue;
      T* c[MR];
      for (int r = 0; r < MR; ++r) c[r] = crow[r] + j * NR;
      const int64_t ncols = a.cols - j * NR < NR ? a.cols - j * NR : NR;
      const int64_t t = k * np + j;
      const T* init = first ? (a.bias ? a.bias + j * NR : zero) : nullptr;
      micro(count[j], s.idx + t * a.kc, arow, a.wpack + s.start[t] * NR, c, mr, ncols, init);
    }
  };
  apply_blocks<MR, kScratch, false, false, true>(a, none_listed, tile);  // kNext: see apply_blocks
}

// Each build's vector-sparse forward (kScratch: as apply_blocks'), and the
// entry that picks the instantiation: summing in scratch blocks where the
// dispatch set them (ApplyArgs::blocks), else in place.
template <typename T, bool kScratch>
void apply_sparse_impl(const SparseApplyArgs<T>& s);
template <typename T>
void apply_sparse_either(const SparseApplyArgs<T>& s) {
  if (s.base.blocks)
    apply_sparse_impl<T, true>(s);
  else
    apply_sparse_impl<T, false>(s);
}

}  // namespace
