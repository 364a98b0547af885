// The masked weight gradient (MaskedWgradArgs, sparse.h), shared by the
// builds that have one: the 32-byte builds' (sparse_kernels.h) and the
// AVX-512 build's (sparse_avx512.cpp). Each includes this inside its own
// namespace after fused_kernels.h (tile_step, tile_add, wgrad_units, kMR,
// kKC, nr) and passes nothing else: the lists are per panel of its tile's
// width nr<T>() (16 float32 in the 32-byte builds, 32 in the AVX-512 one,
// two sparse panels), so where that is wider than sparse_panel<T>() a
// listed panel may hold a masked half: zeroed after the sums
// (zero_masked_halves), as the contract wants every vector whose mask is
// all zero to be zero. Same rules as fused_kernels.h: internal linkage, no
// std templates.

namespace {

// C[ix[r]][j] += sum_q x[q][ix[r]] * B[q][j] for r < mr, j < ncols; x[q] =
// xp[q] read in place, B packed (q, NR); c points at the panel's column 0.
template <typename T>
inline void micro_wg_idx(int64_t n, const T* const* xp, const int32_t* ix, const T* __restrict b, T* c,
                         int64_t ldc, int mr, int64_t ncols) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  constexpr int64_t NR = nr<T>();
  V acc0[kMR], acc1[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = V{};
  for (int64_t q = 0; q < n; ++q) {
    const T* x[kMR];
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) x[r] = xp[q] + ix[r];
    const V b0 = vload(b + q * NR), b1 = vload(b + q * NR + L);
    tile_step<T>(acc0, acc1, b0, b1, x, 0);
  }
  T* rows[kMR];
  for (int r = 0; r < kMR; ++r) rows[r] = c + int64_t(ix[r]) * ldc;
  tile_add<T>(acc0, acc1, rows, 0, mr, ncols);
}

// Per offset k and panel p of grad_w's columns, the input channels whose
// mask row in the panel holds a nonzero.
template <typename T>
void list_masked(const MaskedWgradArgs<T>& s) {
  constexpr int64_t NR = nr<T>();
  const WgradArgs<T>& a = s.base;
  const int64_t np = panels<T>(a.c_out), K = a.pairs.kernel_volume;
  for (int64_t t = 0; t < K * np; ++t) {
    const int64_t k = t / np, p = t % np;
    const int64_t j1 = (p + 1) * NR < a.c_out ? (p + 1) * NR : a.c_out;
    int32_t n = 0;
    for (int64_t c = 0; c < a.c_in; ++c) {
      const T* m = s.mask + (k * a.c_in + c) * a.c_out;
      bool nonzero = false;
      for (int64_t j = p * NR; j < j1; ++j) nonzero |= m[j] != T(0);
      if (nonzero) s.idx[t * a.c_in + n++] = int32_t(c);
    }
    s.count[t] = n;
  }
}

// wgrad_pairs (fused_kernels.h) for the listed channels of offset k: the
// same chunks of kKC pairs and the same sums, tiles of kMR listed channels.
template <typename T>
void wgrad_pairs_masked(const MaskedWgradArgs<T>& s, int64_t k, int64_t s0, int64_t end, bool ident, T* part,
                        T* bp) {
  constexpr int64_t NR = nr<T>();
  const WgradArgs<T>& a = s.base;
  const int64_t np = panels<T>(a.c_out);
  const int32_t* count = s.count + k * np;
  const int32_t* lists = s.idx + k * np * a.c_in;
  const PairList& pl = a.pairs;
  for (int64_t s1 = s0; s1 < end; s1 += kKC) {
    const int64_t n = end - s1 < kKC ? end - s1 : kKC;
    const T* xp[kKC];
    for (int64_t q = 0; q < n; ++q) {
      xp[q] = a.x + (ident ? s1 + q : int64_t(pl.col[s1 + q])) * a.c_in;
      const T* gr = a.g + (ident ? s1 + q : int64_t(pl.row[s1 + q])) * a.c_out;
      for (int64_t p = 0; p < np; ++p) {
        if (count[p] == 0) continue;
        T* d = bp + (p * kKC + q) * NR;
        if ((p + 1) * NR <= a.c_out) {
          vstore(d, vload(gr + p * NR));
          vstore(d + lanes<T>(), vload(gr + p * NR + lanes<T>()));
        } else {
          for (int64_t j = 0; j < NR; ++j) d[j] = p * NR + j < a.c_out ? gr[p * NR + j] : T(0);
        }
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      const int64_t ncols = a.c_out - p * NR < NR ? a.c_out - p * NR : NR;
      const int32_t* list = lists + p * a.c_in;
      for (int64_t i = 0; i < count[p]; i += kMR) {
        const int mr = int(count[p] - i < kMR ? count[p] - i : kMR);
        int32_t ix[kMR];
        for (int r = 0; r < kMR; ++r) ix[r] = list[i + (r < mr ? r : mr - 1)];
        micro_wg_idx(n, xp, ix, bp + p * kKC * NR, part + p * NR, a.c_out, mr, ncols);
      }
    }
  }
}

// grad_w[k][c][panel] = 0 for every sparse panel (sparse_panel<T>()
// columns) of row c whose mask is all zero: where the tile is wider than a
// sparse panel, the sums fill such a panel when its neighbour in the tile's
// columns is listed. Offsets split over threads.
template <typename T>
void zero_masked_halves(const MaskedWgradArgs<T>& s) {
  constexpr int64_t NS = sparse_panel<T>();
  const WgradArgs<T>& a = s.base;
  const int64_t K = a.pairs.kernel_volume;
#pragma omp parallel for num_threads(a.nt) schedule(static) if (a.nt > 1)
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < a.c_in; ++c) {
      const T* m = s.mask + (k * a.c_in + c) * a.c_out;
      T* g = a.grad_w + (k * a.c_in + c) * a.c_out;
      for (int64_t j0 = 0; j0 < a.c_out; j0 += NS) {
        const int64_t j1 = j0 + NS < a.c_out ? j0 + NS : a.c_out;
        bool nonzero = false;
        for (int64_t j = j0; j < j1; ++j) nonzero |= m[j] != T(0);
        if (!nonzero)
          for (int64_t j = j0; j < j1; ++j) g[j] = T(0);
      }
    }
  }
}

// wgrad_impl (fused_kernels.h) with the masked pairs: the same units, the
// same walk and the same reduction in unit order (wgrad_units); an offset
// with no listed channel is not visited.
template <typename T>
void wgrad_masked_impl(const MaskedWgradArgs<T>& s) {
  list_masked(s);
  const int64_t np = panels<T>(s.base.c_out);
  wgrad_units(s.base, [&s, np](int64_t k, int64_t lo, int64_t hi, bool ident, T* part, T*, T* bp) {
    int64_t listed = 0;
    for (int64_t p = 0; p < np; ++p) listed += s.count[k * np + p];
    if (listed) wgrad_pairs_masked(s, k, lo, hi, ident, part, bp);
  });
  if constexpr (nr<T>() != sparse_panel<T>()) zero_masked_halves(s);
}

}  // namespace

void wgrad_masked(const MaskedWgradArgs<float>& a) { wgrad_masked_impl(a); }
void wgrad_masked(const MaskedWgradArgs<double>& a) { wgrad_masked_impl(a); }
