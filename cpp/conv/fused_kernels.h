// Kernels of the fused convolution (see fused.h), compiled once per
// instruction set: the includer opens namespace ps::conv::<isa> and, for the
// AVX2 build, has turned on `#pragma GCC target("avx2,fma")` and included
// <immintrin.h>. Everything here has internal linkage and no std templates,
// so the copies never merge at link time.
//
// Register tile: kMR rows x NR columns (two 32-byte vectors: 16 floats or 8
// doubles), 12 vector accumulators. Per step of the reduction it loads two
// vectors of B and broadcasts one element of each of the kMR A rows.
// acc = sum_k a[r][k] * B[k][:] in k order from zero, then C[r] += acc: the
// same arithmetic for full and partial tiles, so tiling never changes a bit.

namespace {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
inline Vec<float>::type vbroadcast(float x) { return Vec<float>::type{x, x, x, x, x, x, x, x}; }
inline Vec<double>::type vbroadcast(double x) { return Vec<double>::type{x, x, x, x}; }

#if defined(__FMA__) && defined(__AVX2__)
inline Vec<float>::type vfma(Vec<float>::type a, Vec<float>::type b, Vec<float>::type c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline Vec<double>::type vfma(Vec<double>::type a, Vec<double>::type b, Vec<double>::type c) {
  return _mm256_fmadd_pd(a, b, c);
}
#else
template <typename V>
inline V vfma(V a, V b, V c) {
  return a * b + c;
}
#endif

// One step of a register tile: acc{0,1}[r] += x_r * (b0, b1), x_r = *x[r].
template <typename T>
inline void tile_step(typename Vec<T>::type* acc0, typename Vec<T>::type* acc1, typename Vec<T>::type b0,
                      typename Vec<T>::type b1, const T* x0, const T* x1, const T* x2, const T* x3, const T* x4,
                      const T* x5) {
  const T* const x[kMR] = {x0, x1, x2, x3, x4, x5};
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    const typename Vec<T>::type v = vbroadcast(*x[r]);
    acc0[r] = vfma(v, b0, acc0[r]);
    acc1[r] = vfma(v, b1, acc1[r]);
  }
}

// c[r][0:ncols] += acc{0,1}[r] for r in [first, last). Only constant indices
// into acc0/acc1: the accumulators stay in registers (a runtime index would
// send them through the stack).
template <typename T>
inline void tile_add(const typename Vec<T>::type* acc0, const typename Vec<T>::type* acc1, T* const* c, int first,
                     int last, int64_t ncols) {
  constexpr int L = int(32 / sizeof(T));
  constexpr int NR = 2 * L;
  if (ncols == NR && first == 0 && last == kMR) {
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      T* cr = c[r];
      vstore(cr, vload(cr) + acc0[r]);
      vstore(cr + L, vload(cr + L) + acc1[r]);
    }
    return;
  }
  T tmp[kMR][NR];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    vstore(tmp[r], acc0[r]);
    vstore(tmp[r] + L, acc1[r]);
  }
  for (int r = first; r < last; ++r) {
    T* cr = c[r];
    for (int64_t j = 0; j < ncols; ++j) cr[j] += tmp[r][j];
  }
}

// C[r][0:ncols] += sum_k A[r][k] * B[k][0:NR] for r < mr. A[r][k] is
// a[r][k * AS] (AS = 1: rows of a feature matrix; AS = kMR: a packed panel).
// Rows r >= mr of `a` must still be readable (callers repeat a valid row).
template <typename T, int AS>
inline void micro(int64_t kc, const T* const* a, const T* __restrict b, T* const* c, int mr, int64_t ncols) {
  typedef typename Vec<T>::type V;
  constexpr int L = int(32 / sizeof(T));
  constexpr int NR = 2 * L;
  V acc0[kMR], acc1[kMR];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = V{};
  const T* __restrict a0 = a[0];
  const T* __restrict a1 = a[1];
  const T* __restrict a2 = a[2];
  const T* __restrict a3 = a[3];
  const T* __restrict a4 = a[4];
  const T* __restrict a5 = a[5];
  for (int64_t k = 0; k < kc; ++k) {
    const V b0 = vload(b + k * NR), b1 = vload(b + k * NR + L);
    tile_step<T>(acc0, acc1, b0, b1, a0 + k * AS, a1 + k * AS, a2 + k * AS, a3 + k * AS, a4 + k * AS, a5 + k * AS);
  }
  tile_add<T>(acc0, acc1, c, 0, mr, ncols);
}

// wpack[k][p][c][0:NR] = B_k[c][p*NR : p*NR+NR], zero past the last column.
template <typename T>
void pack_weights(const ApplyArgs<T>& a, int64_t c_in, int64_t c_out) {
  constexpr int64_t NR = nr<T>();
  const int64_t np = panels<T>(a.cols), K = a.pairs.kernel_volume;
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = a.w + k * c_in * c_out;
    for (int64_t p = 0; p < np; ++p) {
      T* dst = a.wpack + (k * np + p) * a.kc * NR;
      for (int64_t c = 0; c < a.kc; ++c) {
        for (int64_t j = 0; j < NR; ++j) {
          const int64_t col = p * NR + j;
          T v = T(0);
          if (col < a.cols) v = a.transpose ? wk[col * c_out + c] : wk[c * c_out + col];
          dst[c * NR + j] = v;
        }
      }
    }
  }
}

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += int64_t(64 / sizeof(T))) __builtin_prefetch(p + i);
}

template <typename T>
void apply_impl(const ApplyArgs<T>& a) {
  constexpr int64_t NR = nr<T>();
  const int64_t c_in = a.transpose ? a.cols : a.kc, c_out = a.transpose ? a.kc : a.cols;
  pack_weights(a, c_in, c_out);
  const int64_t np = panels<T>(a.cols), K = a.pairs.kernel_volume;
  const int64_t blocks = (a.num_rows + kBlockRows - 1) / kBlockRows;
  const PairList& pl = a.pairs;
#pragma omp parallel for num_threads(a.nt) schedule(dynamic, 1) if (blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kBlockRows, r1 = r0 + kBlockRows < a.num_rows ? r0 + kBlockRows : a.num_rows;
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict d = a.dst + r * a.cols;
      if (a.bias)
        __builtin_memcpy(d, a.bias, sizeof(T) * static_cast<unsigned long>(a.cols));
      else
        __builtin_memset(d, 0, sizeof(T) * static_cast<unsigned long>(a.cols));
    }
    if (a.kc == 0) continue;
    for (int64_t k = 0; k < K; ++k) {
      const bool ident = k == pl.identity;
      const int64_t lo = ident ? r0 : pl.cuts[blk * K + k], hi = ident ? r1 : pl.cuts[(blk + 1) * K + k];
      const T* wk = a.wpack + k * np * a.kc * NR;
      for (int64_t p = lo; p < hi; p += kMR) {
        const int mr = int(hi - p < kMR ? hi - p : kMR);
        const T* arow[kMR];
        T* crow[kMR];
        for (int r = 0; r < kMR; ++r) {
          const int64_t q = p + (r < mr ? r : mr - 1);
          arow[r] = a.src + (ident ? q : int64_t(pl.col[q])) * a.kc;
          crow[r] = a.dst + (ident ? q : int64_t(pl.row[q])) * a.cols;
        }
        if (!ident) {
          // The next tile's rows are a gather: no hardware prefetcher guesses them.
          const int64_t next_end = p + 2 * kMR < hi ? p + 2 * kMR : hi;
          for (int64_t q = p + kMR; q < next_end; ++q) prefetch_row(a.src + int64_t(pl.col[q]) * a.kc, a.kc);
        }
        for (int64_t j = 0; j < np; ++j) {
          T* c[kMR];
          for (int r = 0; r < kMR; ++r) c[r] = crow[r] + j * NR;
          const int64_t ncols = a.cols - j * NR < NR ? a.cols - j * NR : NR;
          micro<T, 1>(a.kc, arow, wk + j * a.kc * NR, c, mr, ncols);
        }
      }
    }
  }
}

// C[r][j] += sum_q x[q][m0 + r] * B[q][j] for skip_rows <= r < kMR, j <
// ncols; x[q] = xp[q] (rows read in place), B packed (q, NR).
template <typename T>
inline void micro_wg(int64_t n, const T* const* xp, int64_t m0, const T* __restrict b, T* c, int64_t ldc,
                     int skip_rows, int64_t ncols) {
  typedef typename Vec<T>::type V;
  constexpr int L = int(32 / sizeof(T));
  constexpr int NR = 2 * L;
  V acc0[kMR], acc1[kMR];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = V{};
  for (int64_t q = 0; q < n; ++q) {
    const T* __restrict xr = xp[q] + m0;
    const V b0 = vload(b + q * NR), b1 = vload(b + q * NR + L);
    tile_step<T>(acc0, acc1, b0, b1, xr, xr + 1, xr + 2, xr + 3, xr + 4, xr + 5);
  }
  T* rows[kMR];
  for (int r = 0; r < kMR; ++r) rows[r] = c + r * ldc;
  tile_add<T>(acc0, acc1, rows, skip_rows, kMR, ncols);
}

// grad_w partials of pairs [s, end) of offset k into part (c_in x c_out),
// kKC pairs at a time through packed panels; `ident`: the pairs are (s, s).
template <typename T>
void wgrad_pairs(const WgradArgs<T>& a, int64_t s0, int64_t end, bool ident, T* part, T* ap, T* bp) {
  constexpr int64_t NR = nr<T>();
  const int64_t mp = (a.c_in + kMR - 1) / kMR, np = panels<T>(a.c_out);
  const int64_t pfull = a.c_out / NR;
  const PairList& pl = a.pairs;
  for (int64_t s = s0; s < end; s += kKC) {
    const int64_t n = end - s < kKC ? end - s : kKC;
    // bp[p][q][j] = g[row[s+q]][p*NR + j], zero past the last channel; the
    // x rows are read in place (xp), a tile's rows re-read from L1 across p.
    const T* xp[kKC];
    for (int64_t q = 0; q < n; ++q) {
      xp[q] = a.x + (ident ? s + q : int64_t(pl.col[s + q])) * a.c_in;
      const T* gr = a.g + (ident ? s + q : int64_t(pl.row[s + q])) * a.c_out;
      for (int64_t p = 0; p < pfull; ++p) {
        T* d = bp + (p * kKC + q) * NR;
        vstore(d, vload(gr + p * NR));
        vstore(d + NR / 2, vload(gr + p * NR + NR / 2));
      }
      if (pfull < np) {
        T* d = bp + (pfull * kKC + q) * NR;
        for (int64_t j = 0; j < NR; ++j) d[j] = pfull * NR + j < a.c_out ? gr[pfull * NR + j] : T(0);
      }
    }
    if (a.c_in >= kMR) {
      for (int64_t m = 0; m < mp; ++m) {
        // The last tile starts early (m0 <= c_in - kMR) and skips rows done before.
        const int64_t m0 = m * kMR + kMR <= a.c_in ? m * kMR : a.c_in - kMR;
        for (int64_t p = 0; p < np; ++p) {
          const int64_t ncols = a.c_out - p * NR < NR ? a.c_out - p * NR : NR;
          micro_wg(n, xp, m0, bp + p * kKC * NR, part + m0 * a.c_out + p * NR, a.c_out, int(m * kMR - m0), ncols);
        }
      }
      continue;
    }
    // Fewer than kMR input channels: pack x too, zero-padded.
    for (int64_t q = 0; q < n; ++q) {
      T* d = ap + q * kMR;
      for (int r = 0; r < kMR; ++r) d[r] = r < a.c_in ? xp[q][r] : T(0);
    }
    const T* arow[kMR];
    for (int r = 0; r < kMR; ++r) arow[r] = ap + r;
    for (int64_t p = 0; p < np; ++p) {
      T* c[kMR];
      for (int r = 0; r < kMR; ++r) c[r] = part + (r < a.c_in ? r : 0) * a.c_out + p * NR;
      const int64_t ncols = a.c_out - p * NR < NR ? a.c_out - p * NR : NR;
      micro<T, kMR>(n, arow, bp + p * kKC * NR, c, int(a.c_in), ncols);
    }
  }
}

// Units are ranges of row blocks (fixed by the caller, never by the thread
// count). A unit walks its blocks kWgradBlocks at a time and, for each, every
// offset: the rows of x and g it reads stay in L2 across the offsets, and
// the unit's partial grad_w (all offsets) stays in L2 too. Partials are then
// added in unit order.
template <typename T>
void wgrad_impl(const WgradArgs<T>& a) {
  const int64_t K = a.pairs.kernel_volume, psize = a.c_in * a.c_out;
  const int64_t per_thread = wgrad_scratch<T>(a.c_in, a.c_out);
  const PairList& pl = a.pairs;
#pragma omp parallel num_threads(a.nt) if (a.num_units > 1)
  {
    T* ap = a.scratch + int64_t(omp_get_thread_num()) * per_thread;
    T* bp = ap + kMR * kKC;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < a.num_units; ++u) {
      T* part = a.partials + u * K * psize;
      for (int64_t i = 0; i < K * psize; ++i) part[i] = T(0);
      const int64_t b_end = a.units[u + 1];
      for (int64_t b0 = a.units[u]; b0 < b_end; b0 += kWgradBlocks) {
        const int64_t b1 = b0 + kWgradBlocks < b_end ? b0 + kWgradBlocks : b_end;
        for (int64_t k = 0; k < K; ++k) {
          const bool ident = k == pl.identity;
          const int64_t lo = ident ? b0 * kBlockRows : pl.cuts[b0 * K + k];
          const int64_t hi = ident ? (b1 * kBlockRows < a.num_rows ? b1 * kBlockRows : a.num_rows)
                                   : pl.cuts[b1 * K + k];
          if (hi > lo) wgrad_pairs(a, lo, hi, ident, part + k * psize, ap, bp);
        }
      }
    }
    // grad_w[k] = partials added in unit order; offsets and rows split over threads.
    const int64_t rows_per = 8, pieces = (a.c_in + rows_per - 1) / rows_per;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < K * pieces; ++t) {
      const int64_t k = t / pieces, i0 = (t % pieces) * rows_per * a.c_out;
      const int64_t i1 = i0 + rows_per * a.c_out < psize ? i0 + rows_per * a.c_out : psize;
      T* gw = a.grad_w + k * psize;
      for (int64_t i = i0; i < i1; ++i) gw[i] = a.partials[k * psize + i];
      for (int64_t u = 1; u < a.num_units; ++u) {
        const T* part = a.partials + (u * K + k) * psize;
        for (int64_t i = i0; i < i1; ++i) gw[i] += part[i];
      }
    }
  }
}

}  // namespace

void apply(const ApplyArgs<float>& a) { apply_impl(a); }
void apply(const ApplyArgs<double>& a) { apply_impl(a); }
void wgrad(const WgradArgs<float>& a) { wgrad_impl(a); }
void wgrad(const WgradArgs<double>& a) { wgrad_impl(a); }
