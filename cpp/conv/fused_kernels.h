// Kernels of the fused convolution (see fused.h), compiled once per
// instruction set: the includer opens namespace ps::conv::<isa>, defines
// PS_CONV_ISA (its Isa) and PS_CONV_VEC_BYTES (32 or 64) and, for the x86
// builds, has turned on its `#pragma GCC target(...)` and included
// <immintrin.h>. Everything here has internal linkage and no std templates,
// so the copies never merge at link time.
//
// Register tile: kMR rows x NR columns (two vectors of PS_CONV_VEC_BYTES),
// 2 * kMR vector accumulators (tile_shape in fused.h). Per step of the
// reduction it loads two vectors of B and broadcasts one element of each of
// the kMR A rows. The apply kernels: acc = C[r] (or the bias / zero of a
// block's first offset), acc += a[r][k] * B[k][:] in k order, C[r] = acc;
// the weight gradient: acc = the sum in k order from zero, then C[r] += acc.
// The same arithmetic for full and partial tiles, for one or two vectors of
// columns and for every tile shape, so neither tiling nor the vector width
// changes a bit (the FMA builds agree bit for bit).

namespace {

constexpr Isa kIsa = PS_CONV_ISA;
constexpr int kMR = tile_shape(kIsa).mr;
static_assert(tile_shape(kIsa).vec_bytes == PS_CONV_VEC_BYTES, "PS_CONV_VEC_BYTES must match tile_shape");

// This build's columns per tile and column panels of `cols`.
template <typename T>
constexpr int64_t nr() { return conv::nr<T>(kIsa); }
template <typename T>
constexpr int64_t panels(int64_t cols) { return conv::panels<T>(kIsa, cols); }
// Elements of one vector.
template <typename T>
constexpr int lanes() { return int(PS_CONV_VEC_BYTES / sizeof(T)); }

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(PS_CONV_VEC_BYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(PS_CONV_VEC_BYTES)));
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
#if PS_CONV_VEC_BYTES == 64
inline Vec<float>::type vbroadcast(float x) { return Vec<float>::type{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline Vec<double>::type vbroadcast(double x) { return Vec<double>::type{x, x, x, x, x, x, x, x}; }
#else
inline Vec<float>::type vbroadcast(float x) { return Vec<float>::type{x, x, x, x, x, x, x, x}; }
inline Vec<double>::type vbroadcast(double x) { return Vec<double>::type{x, x, x, x}; }
#endif

// The lanes of `m` (bit i: lane i) of p[0:lanes] loaded, the others zero;
// stored: only those lanes written (nothing past them read or written). The
// AVX-512 build's masked loads and stores (tile_panels_full's last, partial
// vector); the other builds take a partial panel through micro, and only
// declare them (tile_panels_full names them in branches never taken there).
template <typename T>
inline typename Vec<T>::type vload_mask(const T* p, unsigned m);
template <typename T>
inline void vstore_mask(T* p, typename Vec<T>::type v, unsigned m);
#if PS_CONV_VEC_BYTES == 64 && (defined(__x86_64__) || defined(__i386__))
template <typename T>
inline typename Vec<T>::type vload_mask(const T* p, unsigned m) {
  if constexpr (sizeof(T) == 4)
    return _mm512_maskz_loadu_ps(__mmask16(m), p);
  else
    return _mm512_maskz_loadu_pd(__mmask8(m), p);
}
template <typename T>
inline void vstore_mask(T* p, typename Vec<T>::type v, unsigned m) {
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, __mmask16(m), v);
  else
    _mm512_mask_storeu_pd(p, __mmask8(m), v);
}
#endif

// acc + a * b in one rounding (FMA) in the FMA builds, chosen by the build
// (kIsa), not by __AVX512F__ / __FMA__ (GCC 12 does not define those under
// `#pragma GCC target` in C++, later GCCs may) nor left to the compiler's
// contraction of a * b + c (the core is built with -ffp-contract=off: GCC
// 12 contracted it here and GCC 13 did not everywhere, and the FMA builds,
// the vector-sparse kernels' intrinsics and the builds of two compilers
// then differed in the last bit). The generic build: a * b + c, two roundings.
template <typename V>
inline V vfma(V a, V b, V c) {
#if defined(__x86_64__) || defined(__i386__)
  constexpr bool is_float = sizeof(a[0]) == 4;
  if constexpr (kIsa == Isa::avx512 && is_float)
    return _mm512_fmadd_ps(a, b, c);
  else if constexpr (kIsa == Isa::avx512)
    return _mm512_fmadd_pd(a, b, c);
  else if constexpr (kIsa == Isa::avx2 && is_float)
    return _mm256_fmadd_ps(a, b, c);
  else if constexpr (kIsa == Isa::avx2)
    return _mm256_fmadd_pd(a, b, c);
  else
    return a * b + c;
#else
  return a * b + c;
#endif
}

// One step of a register tile: acc0[r] += x_r * b0 and (NV = 2) acc1[r] +=
// x_r * b1, x_r = x[r][off], for r < R (a tile of R rows; kMR but in a tail
// tile, see apply_pairs).
template <typename T, int NV = 2, int R = kMR>
inline void tile_step(typename Vec<T>::type* acc0, typename Vec<T>::type* acc1, typename Vec<T>::type b0,
                      typename Vec<T>::type b1, const T* const* x, int64_t off) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const typename Vec<T>::type v = vbroadcast(x[r][off]);
    acc0[r] = vfma(v, b0, acc0[r]);
    if (NV > 1) acc1[r] = vfma(v, b1, acc1[r]);
  }
}

// c[r][0:ncols] += (acc0[r], acc1[r])[0:ncols] for r in [first, last);
// ncols <= NV * lanes (the weight gradient's sums into its partials). Only
// constant indices into acc0/acc1: the accumulators stay in registers (a
// runtime index would send them through the stack).
template <typename T, int NV = 2>
inline void tile_add(const typename Vec<T>::type* acc0, const typename Vec<T>::type* acc1, T* const* c, int first,
                     int last, int64_t ncols) {
  constexpr int L = lanes<T>();
  if (ncols == NV * L) {
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      if (r < first || r >= last) continue;
      T* cr = c[r];
      vstore(cr, vload(cr) + acc0[r]);
      if (NV > 1) vstore(cr + L, vload(cr + L) + acc1[r]);
    }
    return;
  }
  T tmp[kMR][NV * L];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    vstore(tmp[r], acc0[r]);
    if (NV > 1) vstore(tmp[r] + L, acc1[r]);
  }
  for (int r = first; r < last; ++r) {
    T* cr = c[r];
    for (int64_t j = 0; j < ncols; ++j) cr[j] += tmp[r][j];
  }
}

// The apply kernels' accumulators start from what they add to: (acc0[r],
// acc1[r])[0:ncols] = s[0:ncols], zero past ncols, s = c[r], or `init` (ncols
// values: on a block's first offset the bias or zero, so that no pass
// initialises the rows first); then tile_step adds the products in order and
// tile_store writes them back. The rows' loads issue before the products' loop, so a
// row the previous offset wrote arrives while the loop runs; summing into
// the partial sum after the loop (tile_add) exposed that latency on every
// tile. Measured on Zen 4 (KITTI sweep, one thread, bench/sparse_isa.py's
// line): the vector kernel's fixed cost at C = 64 fell from 6.4 to 4.2 ms
// (75% of the vectors pruned: 11.3 -> 9.6 ms), the dense kernel 4% faster
// at C = 64 and 128. The row loop is not unswitched by the compiler: a
// test of ncols inside it cost the dense AVX-512 kernel 7% at C = 128, so
// the full-panel case has its own loop (as tile_add). Rows r >= mr repeat
// a valid row (apply_pairs): read, never written here (tile_panels_full
// stores them: the repeated row's own bits, to its own place).
template <typename T, int NV = 2>
inline void tile_load(typename Vec<T>::type* acc0, typename Vec<T>::type* acc1, T* const* c, int64_t ncols,
                      const T* init) {
  constexpr int L = lanes<T>();
  if (ncols == NV * L) {
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const T* sr = init ? init : c[r];
      acc0[r] = vload(sr);
      if (NV > 1) acc1[r] = vload(sr + L);
    }
    return;
  }
  T tmp[kMR][NV * L] = {};
  for (int r = 0; r < kMR; ++r) {
    const T* sr = init ? init : c[r];
    for (int64_t j = 0; j < ncols; ++j) tmp[r][j] = sr[j];
  }
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    acc0[r] = vload(tmp[r]);
    if (NV > 1) acc1[r] = vload(tmp[r] + L);
  }
}

// c[r][0:ncols] = (acc0[r], acc1[r])[0:ncols] for r < mr.
template <typename T, int NV = 2>
inline void tile_store(const typename Vec<T>::type* acc0, const typename Vec<T>::type* acc1, T* const* c, int mr,
                       int64_t ncols) {
  constexpr int L = lanes<T>();
  if (ncols == NV * L) {
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      if (r >= mr) continue;
      vstore(c[r], acc0[r]);
      if (NV > 1) vstore(c[r] + L, acc1[r]);
    }
    return;
  }
  T tmp[kMR][NV * L];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    vstore(tmp[r], acc0[r]);
    if (NV > 1) vstore(tmp[r] + L, acc1[r]);
  }
  for (int r = 0; r < mr; ++r)
    for (int64_t j = 0; j < ncols; ++j) c[r][j] = tmp[r][j];
}

// C[r][0:ncols] += sum_k A[r][k] * B[k][0:ncols] for r < mr. A[r][k] is
// a[r][col(k)] (micro: col(k) = k * AS, AS = 1 for rows of a feature matrix,
// kMR for a packed panel; micro_idx: the k-th listed row);
// B rows are NR apart, of which NV vectors are read (NV = 1 for a last panel
// of at most one vector: half the work). Rows r >= mr of `a` must still be
// readable (callers repeat a valid row). kFromC (the apply kernels): the
// sum runs from C[r] (tile_load: C[r] + p_0 + p_1 + ..., in k order), or
// from `init` (C[r] = init + the sum); else (the weight gradient, init
// null) from zero and is added to C[r] after (tile_add).
template <typename T, int NV, bool kFromC, typename Col>
inline void micro_nv(int64_t kc, Col col, const T* const* a, const T* __restrict b, T* const* c, int mr,
                     int64_t ncols, const T* init) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  constexpr int64_t NR = nr<T>();
  V acc0[kMR], acc1[kMR];
  if (kFromC) {
    tile_load<T, NV>(acc0, acc1, c, ncols, init);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = V{};
  }
  const T* x[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) x[r] = a[r];
  for (int64_t k = 0; k < kc; ++k) {
    const V b0 = vload(b + k * NR), b1 = NV > 1 ? vload(b + k * NR + L) : V{};
    tile_step<T, NV>(acc0, acc1, b0, b1, x, col(k));
  }
  if (kFromC)
    tile_store<T, NV>(acc0, acc1, c, mr, ncols);
  else
    tile_add<T, NV>(acc0, acc1, c, 0, mr, ncols);
}

// micro_nv with NV chosen by ncols; A[r][k] is a[r][col(k)] (col: the k-th
// column read, k * AS in micro, a listed row in the vector kernels).
template <typename T, bool kFromC, typename Col>
inline void micro_cols(int64_t kc, Col col, const T* const* a, const T* __restrict b, T* const* c, int mr,
                       int64_t ncols, const T* init) {
  if (ncols <= lanes<T>())
    micro_nv<T, 1, kFromC>(kc, col, a, b, c, mr, ncols, init);
  else
    micro_nv<T, 2, kFromC>(kc, col, a, b, c, mr, ncols, init);
}

template <typename T, int AS, bool kFromC = false>
inline void micro(int64_t kc, const T* const* a, const T* __restrict b, T* const* c, int mr, int64_t ncols,
                  const T* init = nullptr) {
  micro_cols<T, kFromC>(kc, [](int64_t k) { return k * AS; }, a, b, c, mr, ncols, init);
}

// A tile of one offset across all np panels of a product whose columns
// fill whole panels (C_out a multiple of NR), or whole panels and a last one
// of one vector (tiles_whole_panels; that one in one-vector tiles): for
// panel j, C[r][j*NR : j*NR+NR] = (C[r] or, on a block's first offset, the
// bias or zero) + sum_i A[r][col(i)] * B_j[i][:] in i order, i < steps(j),
// col = cols(j), B_j = b(j) packed (steps, NR): micro's sums panel by panel,
// bit for bit, without its per-call work (no test of the panel's width or
// of mr, the rows' pointers set once for all panels, the bias or zero loaded
// once for all rows) and with the steps unrolled by two. A panel of no step
// is stored on the first offset (its init) and skipped on the others. All
// R rows are stored: in a partial tile the rows past mr repeat row mr - 1
// (apply_pairs: the same row read, the same row written, and an offset
// writes a row at most once), so they compute its sum again and store the
// same bits to the same place. On the KITTI sweep, one thread, AMD EPYC Zen
// 3 [avx2] (bench/RESULTS.md "Dense kernels a fifth faster"): the dense
// conv's instructions per call -21% at C = 64 (22 a step of 12 FMAs, 26
// before), -24% at C = 8; its forward 0.79x / 0.85x / 0.84x the build
// before's time at C = 64 / 32 / 8 (bench/ab_builds.py).
template <int N>
struct Vectors {  // a constant to pass through generic lambdas
  static constexpr int value = N;
};
// Whether tile_panels_full takes a product of `cols` columns: whole panels,
// or whole panels and a last one of exactly one vector (C_out = 8 or 24
// floats in the 32-byte builds).
template <typename T>
constexpr bool tiles_whole_panels(int64_t cols) {
  return cols % nr<T>() == 0 || cols % nr<T>() == lanes<T>();
}
// kLastOne: the last panel is one vector (else every panel is two); R: the
// tile's rows (kMR, or fewer in a tail tile: apply_pairs). kPart (the
// AVX-512 build, a last panel of part of a vector or of one vector and
// part of another: apply_impl): that panel's last vector is loaded
// and stored in the lanes `tail` holds only (its bias too; the packed
// weight is zero past the last column), 1: the panel is that one vector, 2:
// a whole vector and that one; the same FMAs per column as every tile.
template <typename T, bool kLastOne, int R = kMR, int kPart = 0, typename Steps, typename Cols, typename BPanel>
inline void tile_panels_full(int64_t np, Steps steps, Cols cols, BPanel b, const T* const* arow, T* const* crow,
                             const T* bias, bool first, unsigned tail = 0) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  constexpr int64_t NR = nr<T>();
  const T* x[R];
  T* c[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    x[r] = arow[r];
    c[r] = crow[r];
  }
  // Panel j in NV vectors (NV = 1: nothing past the panel's first vector is
  // read or written: not the bias, not the rows); `masked`: its last vector
  // in the lanes of `tail` only.
  const auto panel = [&](auto vectors, int64_t j, int64_t n, auto masked) {
    constexpr int NV = decltype(vectors)::value;
    constexpr bool M = decltype(masked)::value;
    const auto ld0 = [&](const T* p) -> V {
      if constexpr (M && NV == 1) return vload_mask<T>(p, tail);
      return vload(p);
    };
    const auto ld1 = [&](const T* p) -> V {
      if constexpr (M && NV == 2) return vload_mask<T>(p, tail);
      return vload(p);
    };
    const auto st0 = [&](T* p, V v) {
      if constexpr (M && NV == 1) vstore_mask<T>(p, v, tail);
      else vstore(p, v);
    };
    const auto st1 = [&](T* p, V v) {
      if constexpr (M && NV == 2) vstore_mask<T>(p, v, tail);
      else vstore(p, v);
    };
    // A panel of no step (a block's first offset) stores its init and no
    // more, on a path of its own: where it shared the loop's exit, GCC kept
    // the accumulators in the stack across it (12 stores and 12 loads of
    // them a panel, and as many copies); instructions per call at C = 64
    // (bench/conv_instructions.py, AMD EPYC Zen 3 [avx2]) dense 299.27 ->
    // 292.92 M, vectors 75% 98.77 -> 93.79 M (with their compact packing).
    // The bias is loaded in this path and in the `first` one apart: loaded
    // once above both, the vector kernel compiled to 96.76 M again.
    if (n == 0) {
      const V i0 = bias ? ld0(bias + j * NR) : V{}, i1 = NV > 1 && bias ? ld1(bias + j * NR + L) : V{};
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        st0(c[r] + j * NR, i0);
        if (NV > 1) st1(c[r] + j * NR + L, i1);
      }
      return;
    }
    if (n < 1) __builtin_unreachable();
    V acc0[R], acc1[R];
    if (first) {
      const V i0 = bias ? ld0(bias + j * NR) : V{}, i1 = NV > 1 && bias ? ld1(bias + j * NR + L) : V{};
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        acc0[r] = i0;
        acc1[r] = i1;
      }
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        acc0[r] = ld0(c[r] + j * NR);
        acc1[r] = NV > 1 ? ld1(c[r] + j * NR + L) : V{};
      }
    }
    const auto col = cols(j);
    const T* __restrict bj = b(j);
    // The step as a lambda: the same loop written inline compiled to 3% more
    // instructions in the vector kernel (96.79 against 93.79 M a call at C =
    // 64, vectors 75%; bench/conv_instructions.py, GCC 12).
    const auto step = [&](int64_t i) {
      const V b0 = vload(bj + i * NR), b1 = NV > 1 ? vload(bj + i * NR + L) : V{};
      tile_step<T, NV, R>(acc0, acc1, b0, b1, x, col(i));
    };
#pragma GCC unroll 2
    for (int64_t i = 0; i < n; ++i) step(i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      st0(c[r] + j * NR, acc0[r]);
      if (NV > 1) st1(c[r] + j * NR + L, acc1[r]);
    }
  };
  static_assert(kPart == 0 || !kLastOne, "a partial last panel is not also a whole vector");
  const int64_t two = kLastOne || kPart ? np - 1 : np;  // whole panels of two vectors
  for (int64_t j = 0; j < two; ++j) {
    const int64_t n = steps(j);
    if (n != 0 || first) panel(Vectors<2>(), j, n, Vectors<0>());
  }
  if (kLastOne) {
    const int64_t n = steps(two);
    if (n != 0 || first) panel(Vectors<1>(), two, n, Vectors<0>());
  }
  if (kPart) {
    const int64_t n = steps(two);
    if (n != 0 || first) panel(Vectors<kPart>(), two, n, Vectors<1>());
  }
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
      const int64_t ncols = a.cols - p * NR < NR ? a.cols - p * NR : NR;
      for (int64_t c = 0; c < a.kc; ++c) {
        T* row = dst + c * NR;
        if (!a.transpose)  // the panel's columns of row c are contiguous in W_k
          __builtin_memcpy(row, wk + c * c_out + p * NR, sizeof(T) * static_cast<unsigned long>(ncols));
        else  // W_k^T: a column of W_k, read with a stride
          for (int64_t j = 0; j < ncols; ++j) row[j] = wk[(p * NR + j) * c_out + c];
        for (int64_t j = ncols; j < NR; ++j) row[j] = T(0);
      }
    }
  }
}

// The lines of the row p[0:n], the first without a loop: a row of at most
// one line (C <= 16 floats) costs one instruction (and n == 0 costs a
// prefetch of p, harmless: a prefetch never faults).
template <bool kWrite = false, typename T>
inline void prefetch_row(const T* p, int64_t n) {
  constexpr int64_t kLine = int64_t(64 / sizeof(T));
  __builtin_prefetch(p, kWrite ? 1 : 0);
  for (int64_t i = kLine; i < n; i += kLine) __builtin_prefetch(p + i, kWrite ? 1 : 0);
}

// The pairs [lo, hi) of offset k in tiles of MR rows: `tile(k, arow, crow,
// mr, first)` adds the tile's products (arow: the rows read, crow: the rows
// written, rows past mr repeat a valid one; `first`: store instead, see
// apply_blocks). `ident`: the pairs are (q, q), q in [lo, hi). MR: rows
// per tile (a kernel with its own tile height passes it to apply_blocks).
// kTails: the tile also takes a tile height R first, `tile(Vectors<R>(), k,
// arow, crow, mr, first)` (arow, crow: R rows), and in the AVX-512 build the
// last pairs of a run that fill no whole tile go in tail tiles of 4, 2 and
// 1 rows (those of its binary digits), so that no row is computed twice:
// the same sums per row (a tile's height changes no row's arithmetic). A
// run of an offset in a block holds 36 pairs on average on the KITTI sweep
// with 75% of the offsets pruned, where tiles of 8 computed 7.8% of their
// rows again. On AMD EPYC Zen 4, one thread, bench/ab_builds.py in
// lockstep (bench/RESULTS.md, stop 32): the AVX-512 forward 0.974 / 0.976
// of the time before dense at C = 64 / 128, offset-pruned 0.96-0.98, at
// that machine's noise but of one sign in every run; the AVX2 build (6-row
// tiles, 12 ymm accumulators) gained nothing, tails of 4, 2 and 1 rows or
// of 4 alone (0.98-1.03x): its small tiles have too few accumulators for
// the FMAs' latency, and it keeps its partial tiles.
// Args: ApplyArgs<T>, or ApplyBf16Args (bf16 rows read, float rows written).
// kScratch: written row q lives at out + (q - row0) * a.cols (the block's
// scratch and its first row, ApplyArgs::blocks); else at a.dst + q * a.cols
// (out and row0 not read).
template <int MR = kMR, bool kScratch = false, bool kTails = false, typename Args, typename Out, typename Tile>
inline void apply_pairs(const Args& a, int64_t k, int64_t lo, int64_t hi, bool ident, bool first, Out out,
                        int64_t row0, Tile& tile) {
  const PairList& pl = a.pairs;
  if (!kScratch) {
    out = a.dst;
    row0 = 0;
  }
  // Tail tiles in the AVX-512 build only (see above); elsewhere a partial
  // full tile, as without kTails.
  constexpr bool kSmall = kTails && kIsa == Isa::avx512;
  const int64_t whole = kSmall ? lo + (hi - lo) / MR * MR : hi;  // where the tail tiles start
  for (int64_t p = lo; p < whole; p += MR) {
    const int mr = int(whole - p < MR ? whole - p : MR);
    decltype(a.src) arow[MR];
    decltype(a.dst) crow[MR];
    if (mr == MR) {  // a full tile (most of them): no clamp per row
      for (int r = 0; r < MR; ++r) {
        arow[r] = a.src + (ident ? p + r : int64_t(pl.col[p + r])) * a.kc;
        crow[r] = out + ((ident ? p + r : int64_t(pl.row[p + r])) - row0) * a.cols;
      }
    } else {
      for (int r = 0; r < MR; ++r) {
        const int64_t q = p + (r < mr ? r : mr - 1);
        arow[r] = a.src + (ident ? q : int64_t(pl.col[q])) * a.kc;
        crow[r] = out + ((ident ? q : int64_t(pl.row[q])) - row0) * a.cols;
      }
    }
    // The next tile's rows, one tile ahead: the rows read (a gather that no
    // hardware prefetcher guesses; on the identity pass the next rows, which
    // it does not fetch early enough either) and, on the first pass, the
    // rows written, for writing. Measured on Zen 4 (KITTI sweep, C = 64, one
    // thread, in one process): the vector-sparse forward 12.2 -> 10.5 ms at
    // 75% of the vectors pruned, 17.5 -> 16.2 ms at 50%, dense within 1%;
    // C = 128 unchanged.
    const int64_t next_end = p + 2 * MR < hi ? p + 2 * MR : hi;
    for (int64_t q = p + MR; q < next_end; ++q) {
      prefetch_row(a.src + (ident ? q : int64_t(pl.col[q])) * a.kc, a.kc);
      if (first) prefetch_row<true>(out + ((ident ? q : int64_t(pl.row[q])) - row0) * a.cols, a.cols);
    }
    if constexpr (kTails)
      tile(Vectors<MR>(), k, arow, crow, mr, first);
    else
      tile(k, arow, crow, mr, first);
  }
  if constexpr (kSmall) {
    static_assert(MR <= 8, "tail tiles of 4, 2 and 1 rows cover a remainder below 8");
    int64_t p = whole;
    const auto tail = [&](auto height) {
      constexpr int R = decltype(height)::value;
      if (R < MR && hi - p >= R) {
        decltype(a.src) arow[R];
        decltype(a.dst) crow[R];
        for (int r = 0; r < R; ++r) {
          arow[r] = a.src + (ident ? p + r : int64_t(pl.col[p + r])) * a.kc;
          crow[r] = out + ((ident ? p + r : int64_t(pl.row[p + r])) - row0) * a.cols;
        }
        tile(Vectors<R>(), k, arow, crow, R, first);
        p += R;
      }
    };
    tail(Vectors<4>());
    tail(Vectors<2>());
    tail(Vectors<1>());
  }
}

// The epilogue of a block's rows [r0, r1) (dst += add, then the ReLU): one pass while they are in cache, in
// place of a residual sum and a ReLU of their own over the whole output
// (each a pass through memory).
template <typename T>
inline void block_epilogue(T* __restrict d, const T* __restrict add, bool relu, int64_t n) {
  if (add) {
    if (relu) {
      for (int64_t i = 0; i < n; ++i) {
        const T v = d[i] + add[i];
        d[i] = v < 0 ? 0 : v;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] += add[i];
    }
  } else if (relu) {
    for (int64_t i = 0; i < n; ++i) d[i] = d[i] < 0 ? 0 : d[i];
  }
}
// The rows [r0, r1) at `rows` (dst's or the block scratch's).
template <typename T>
inline void block_epilogue(const ApplyArgs<T>& a, T* rows, int64_t r0, int64_t r1) {
  block_epilogue(rows, a.add ? a.add + r0 * a.cols : nullptr, a.relu, (r1 - r0) * a.cols);
}
// The bf16 kernel's: dst += the bf16 residual (widened exactly), then the
// ReLU, in float32 (rounded once after, with the block).
template <bool kRelu>
inline void add_bf16(float* __restrict d, const uint16_t* __restrict add, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(add[i]) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    const float v = d[i] + f;
    d[i] = kRelu && v < 0 ? 0.0f : v;
  }
}
inline void block_epilogue(const ApplyBf16Args& a, float* rows, int64_t r0, int64_t r1) {
  const int64_t n = (r1 - r0) * a.cols;
  if (a.add == nullptr)
    block_epilogue<float>(rows, nullptr, a.relu, n);
  else if (a.relu)
    add_bf16<true>(rows, a.add + r0 * a.cols, n);
  else
    add_bf16<false>(rows, a.add + r0 * a.cols, n);
}

// The block scratch of ApplyArgs (null: rows summed in place), or the bf16
// kernel's blocks of sums (null: summed in dst); scratch_rows: its rows a
// thread (ApplyArgs: two blocks; the bf16 kernel: one, no more rows than
// the output has, so that a short output with wide rows allocates no more
// than it).
template <typename T>
inline T* block_scratch(const ApplyArgs<T>& a) { return a.blocks; }
inline float* block_scratch(const ApplyBf16Args& a) { return a.sums; }
template <typename T>
inline int64_t scratch_rows(const ApplyArgs<T>&) { return 2 * kBlockRows; }
inline int64_t scratch_rows(const ApplyBf16Args& a) { return a.num_rows < kBlockRows ? a.num_rows : kBlockRows; }

// d[0:n] = s[0:n] with streaming stores (non-temporal: the lines are written
// to memory without being read first and without taking cache space); d and
// s at this build's vector boundary, n whole vectors (attach_blocks).
// stream_fence orders them before what the thread writes next.
template <typename T>
inline void stream_rows(T* __restrict d, const T* __restrict s, int64_t n) {
#if defined(__SSE2__)  // x86: every build's translation unit includes <immintrin.h>
  // Chosen by the build (kIsa), not by __AVX__ / __AVX512F__: GCC does not
  // define those under `#pragma GCC target` in C++ (see sparse_avx512.cpp),
  // and the wider builds would take the 16-byte stores.
  constexpr int64_t L = kIsa == Isa::avx512 ? 64 / int64_t(sizeof(T)) : kIsa == Isa::avx2 ? 32 / int64_t(sizeof(T))
                                                                                          : 16 / int64_t(sizeof(T));
  for (int64_t i = 0; i < n; i += L) {
    if constexpr (kIsa == Isa::avx512 && sizeof(T) == 4)
      _mm512_stream_ps(reinterpret_cast<float*>(d + i), _mm512_load_ps(reinterpret_cast<const float*>(s + i)));
    else if constexpr (kIsa == Isa::avx512)
      _mm512_stream_pd(reinterpret_cast<double*>(d + i), _mm512_load_pd(reinterpret_cast<const double*>(s + i)));
    else if constexpr (kIsa == Isa::avx2 && sizeof(T) == 4)
      _mm256_stream_ps(reinterpret_cast<float*>(d + i), _mm256_load_ps(reinterpret_cast<const float*>(s + i)));
    else if constexpr (kIsa == Isa::avx2)
      _mm256_stream_pd(reinterpret_cast<double*>(d + i), _mm256_load_pd(reinterpret_cast<const double*>(s + i)));
    else if constexpr (sizeof(T) == 4)
      _mm_stream_ps(reinterpret_cast<float*>(d + i), _mm_load_ps(reinterpret_cast<const float*>(s + i)));
    else
      _mm_stream_pd(reinterpret_cast<double*>(d + i), _mm_load_pd(reinterpret_cast<const double*>(s + i)));
  }
#else
  __builtin_memcpy(d, s, sizeof(T) * static_cast<unsigned long>(n));
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A finished block in a thread's scratch, not yet in dst: `left` elements
// from src to dst. The walk streams a tile's worth of rows of it after each
// tile of the thread's next block, so that its writes go out while that
// block's products run.
template <typename P>
struct Drain {
  P dst = nullptr, src = nullptr;
  int64_t left = 0;
  inline void step(int64_t n) {
    if (left == 0) return;
    n = n < left ? n : left;
    stream_rows(dst, src, n);
    dst += n;
    src += n;
    left -= n;
  }
};

// The block walk every apply kernel shares. Each thread owns blocks of
// kBlockRows written rows. Where the identity offset runs (a submanifold
// map), it goes first and its tiles store bias (or zero) + their products
// into every row of the block: the rows need no pass of their own. Else the
// rows start as the bias (or zero). Then every other offset k that
// `skip(k)` keeps adds its pairs (apply_pairs), in offset order; then
// block_epilogue (the residual and the ReLU) while the block is still in
// cache, and `done(r0, r1, rows)` on the block's rows [r0, r1), summed at
// `rows` (a kernel's own epilogue). Args as apply_pairs'.
// a where kFirst, else b.
template <bool kFirst, typename A, typename B>
inline auto& either(A& a, B& b) {
  if constexpr (kFirst)
    return a;
  else
    return b;
}
struct NoEpilogue {
  template <typename P>
  void operator()(int64_t, int64_t, P) const {}
};
struct NoFinish {
  void operator()() const {}
};
// kScratch: each thread sums its block in a scratch block of its own
// (block_scratch(a)). ApplyArgs (a.blocks set): two of them, the block
// streamed to dst while its next block runs (kDrain). ApplyBf16Args
// (a.sums set, no dst): one, which `done` rounds into dst_bf16; dst is
// never written. Scratch and in place are two instantiations, each
// kernel's tile called from one place:
// with both in one function GCC no longer inlined the dense tile (C = 8:
// 4.5% more instructions a conv, bench/conv_instructions.py).
// kTails: the tile takes tail tiles (apply_pairs).
// finish(): called by the thread after a block's last tile, before the
// epilogue (a tile whose sums reach their rows later, as the AMX form's
// pipeline, adds what it holds); leave(): by each thread of the walk once
// it has no block left (the AMX form gives its tiles back).
// kAhead (the dense kernels' where the pairs skip offsets: skips_offsets):
// after each tile of a block, a share of the rows that the thread's next
// block (guessed: nt blocks on, as the threads take them in turn; exact on
// one thread) reads is fetched into L2 (prefetcht1), so that they are there
// when it runs. Why: a block's pairs read the rows of its neighbourhood (a
// few x slices of the sorted coords) whichever offsets run; the unpruned
// conv reads each such row from memory once and then from cache for its
// other offsets, while with offsets pruned the same rows serve fewer pairs
// and their fetch is exposed. On AMD EPYC Zen 4 (KITTI sweep, C = 64,
// bench/ab_builds.py in lockstep, bench/RESULTS.md stop 32): one thread,
// offsets 75% pruned 0.85-0.92x the time, 50% 0.87-0.92x; two threads
// 0.96 / 0.95; nothing at C = 128. The instantiation without it is the walk
// of before.
// kNext (the vector-sparse walk, sparse_walk.h, and the bf16 one,
// fused_bf16.cpp): once a block's identity pass is done, after each of its
// other tiles a share of the rows the thread's next block (guessed as
// kAhead's) opens with is fetched into L2 (prefetcht1): its identity
// pass's read rows and, summing in place, its written rows, two contiguous
// runs, paced to end with the block's tiles; where those rows take at most
// kNextBytes a block. Why: the identity pass streams a block's rows in
// from memory (its other offsets then find them in L2) with few FMAs to
// hide them behind, and the sparse tiles have fewer still. On an Intel
// Xeon (KITTI sweep, bench/ab_builds.py in lockstep, bench/RESULTS.md stop
// 61): C = 64, one thread, twin vectors 75% / 50% 0.941 / 0.954x the time,
// vectors 75% 0.948x; two threads 0.939 / 0.955x; C = 32 0.934 / 0.976x;
// the bf16 kernels' vectors 75% 0.953x, their dense form 0.984x. At C =
// 128 (512 KB of rows a block) twins 75% 0.99x, 50% 1.01-1.02x, vectors
// 50% 1.02x: off there (kNextBytes). On an AMD EPYC Zen 5 (stop 70, the
// same command, two copies of each build in lockstep) it cost instead:
// C = 64, two threads, twins 75% / 50% 1.08 / 1.09x the time, vectors
// 75% / 50% 1.07 / 1.10x; one thread 1.01 / 1.06x and 1.05 / 1.04x; so
// it runs on Intel CPUs only (next_block_fetch(), isa.h). The float32 dense walk has none:
// with it (C = 64, two copies of each build) dense timed 0.96-1.01x and
// offsets 75% 1.01-1.05x, where a second copy of the build without it
// timed 1.03-1.04x: no gain out of the spread between processes. Needs the identity offset (the read rows
// of the identity pass are the written rows' own).
constexpr int64_t kNextBytes = int64_t(256) << 10;
template <int MR = kMR, bool kScratch = false, bool kTails = false, bool kAhead = false, bool kNext = false,
          typename Args, typename Skip, typename Tile, typename Done = NoEpilogue, typename Finish = NoFinish,
          typename Leave = NoFinish>
void apply_blocks(const Args& a, Skip skip, Tile tile, Done done = Done(), Finish finish = Finish(),
                  Leave leave = Leave()) {
  typedef decltype(a.dst) Out;
  const int64_t K = a.pairs.kernel_volume;
  const int64_t blocks = (a.num_rows + kBlockRows - 1) / kBlockRows;
  const PairList& pl = a.pairs;
  const int64_t ident = a.kc > 0 && pl.identity >= 0 && !skip(pl.identity) ? pl.identity : -1;
  const Out scratch = kScratch ? block_scratch(a) : nullptr;
  constexpr bool kDrain = kScratch && !std::is_same<std::decay_t<Args>, ApplyBf16Args>::value;
  const bool next_fetch = kNext && next_block_fetch();  // (the CPU's kind: see kNext above)
#pragma omp parallel num_threads(a.nt) if (blocks > 1)
  {
    // With a scratch: this thread's blocks of it (kDrain: two, one summed
    // into while the other drains to dst; else one, of at most num_rows
    // rows: scratch_rows(a)).
    const Out mine = kScratch ? scratch + int64_t(omp_get_thread_num()) * scratch_rows(a) * a.cols : nullptr;
    // The end of block b's rows, and its tiles of the offsets after the
    // identity pass (kAhead's and kNext's pace).
    const auto block_end = [&a](int64_t b) {
      return (b + 1) * kBlockRows < a.num_rows ? (b + 1) * kBlockRows : a.num_rows;
    };
    const auto other_tiles = [&](int64_t b) {
      int64_t tiles = 0;
      for (int64_t k = 0; k < K; ++k)
        if (k != pl.identity && !skip(k)) tiles += (pl.cuts[(b + 1) * K + k] - pl.cuts[b * K + k] + MR - 1) / MR;
      return tiles;
    };
    int half = 0;
    Drain<Out> pending;
    // kAhead: the cursor over the next block's pairs (offset ak, pair aq of
    // its run that ends at aend), apace pairs fetched a tile.
    int64_t anext = 0, ak = K, aq = 0, aend = 0, apace = 0;
    // kNext: whether this walk fetches (an identity pass, whose rows fit
    // kNextBytes a block; the written rows where it sums in place), the
    // next block's runs not fetched yet (their next line and the bytes
    // left) and the lines fetched of each after a tile.
    const bool next_in_place = !kScratch && a.dst != nullptr;
    const bool next_on = kNext && ident >= 0 && next_fetch &&
                         (a.kc * int64_t(sizeof(*a.src)) + (next_in_place ? a.cols * int64_t(sizeof(*a.dst)) : 0)) *
                                 kBlockRows <=
                             kNextBytes;
    const char* next_src = nullptr;
    const char* next_dst = nullptr;
    int64_t src_left = 0, dst_left = 0, next_pace = 0;
    const auto fetch_next = [&]() {
      // Written here, not in a helper: as fetch_ahead's.
      for (int64_t n = next_pace; n > 0 && src_left > 0; --n, next_src += 64, src_left -= 64)
        __builtin_prefetch(next_src, 0, 2);
      for (int64_t n = next_pace; n > 0 && dst_left > 0; --n, next_dst += 64, dst_left -= 64)
        __builtin_prefetch(next_dst, 0, 2);
    };
    const auto fetch_ahead = [&]() {
      for (int64_t n = apace; n > 0 && ak < K;) {
        if (aq == aend) {
          do {
            ++ak;
          } while (ak < K && (ak == pl.identity || skip(ak)));
          if (ak < K) {
            aq = pl.cuts[anext * K + ak];
            aend = pl.cuts[(anext + 1) * K + ak];
          }
          continue;
        }
        // Written here, not in a helper: GCC drops a function whose only
        // effect is a prefetch, and the call with it.
        const auto* row = a.src + int64_t(pl.col[aq]) * a.kc;
        for (int64_t i = 0; i < a.kc; i += int64_t(64 / sizeof(*row))) __builtin_prefetch(row + i, 0, 2);
        ++aq;
        --n;
      }
    };
    // The tile as apply_pairs calls it, with a tile height first or not
    // (kTails). The one without is typed, as it was before the tile heights
    // came: a generic wrapper compiles the vector and bf16 kernels, which
    // take no tile height, to other code (their walk otherwise unchanged;
    // no timing on the noisy Zen 4 told the two apart).
    const auto typed = [&tile, &pending, &a, &fetch_next](int64_t k, decltype(a.src) const* arow,
                                                          Out const* crow, int mr, bool first) {
      if constexpr (!kTails) {  // else never called
        tile(k, arow, crow, mr, first);
        if constexpr (kNext) fetch_next();
        if (kDrain) pending.step(MR * a.cols);
      }
    };
    const auto with_height = [&tile, &pending, &a, &fetch_ahead, &fetch_next](
                                 auto height, int64_t k, decltype(a.src) const* arow, Out const* crow, int mr,
                                 bool first) {
      tile(height, k, arow, crow, mr, first);
      if constexpr (kNext) fetch_next();
      if (kDrain) pending.step(MR * a.cols);
      if constexpr (kAhead) fetch_ahead();
    };
    auto& tl = either<kTails>(with_height, typed);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if constexpr (kAhead) {
        anext = blk + a.nt;
        ak = K;
        if (anext < blocks) {
          const int64_t tiles = (ident >= 0 ? kBlockRows / MR : 0) + other_tiles(blk);
          int64_t pairs = 0;
          for (int64_t k = 0; k < (a.kc == 0 ? 0 : K); ++k)
            if (k != pl.identity && !skip(k)) pairs += pl.cuts[(anext + 1) * K + k] - pl.cuts[anext * K + k];
          ak = -1;
          aq = aend = 0;
          apace = tiles > 0 ? (pairs + tiles - 1) / tiles : pairs;
        }
      }
      const int64_t r0 = blk * kBlockRows, r1 = block_end(blk);
      // Where the rows are summed: a scratch block, or in place.
      const Out out = kScratch ? mine + half * kBlockRows * a.cols : a.dst + r0 * a.cols;
      if (ident >= 0) {
        apply_pairs<MR, kScratch, kTails>(a, ident, r0, r1, true, true, out, r0, tl);
        // kNext: the next block's runs, fetched over this block's other tiles (the identity pass fetched its
        // own rows one tile ahead, as apply_pairs does).
        const int64_t nb = blk + a.nt;
        if (next_on && nb < blocks) {
          const int64_t n0 = nb * kBlockRows, rows = block_end(nb) - n0, tiles = other_tiles(blk);
          next_src = reinterpret_cast<const char*>(a.src + n0 * a.kc);
          src_left = rows * a.kc * int64_t(sizeof(*a.src));
          next_dst = next_in_place ? reinterpret_cast<const char*>(a.dst + n0 * a.cols) : nullptr;
          dst_left = next_in_place ? rows * a.cols * int64_t(sizeof(*a.dst)) : 0;
          const int64_t lines = ((src_left > dst_left ? src_left : dst_left) + 63) / 64;
          next_pace = tiles > 0 ? (lines + tiles - 1) / tiles : 0;
        } else {
          src_left = dst_left = 0;
        }
      } else {
        for (int64_t r = r0; r < r1; ++r) {
          Out __restrict d = out + (r - r0) * a.cols;
          if (a.bias)
            __builtin_memcpy(d, a.bias, sizeof(*d) * static_cast<unsigned long>(a.cols));
          else
            __builtin_memset(d, 0, sizeof(*d) * static_cast<unsigned long>(a.cols));
        }
      }
      for (int64_t k = 0; k < (a.kc == 0 ? 0 : K); ++k) {
        if (k == pl.identity || skip(k)) continue;
        apply_pairs<MR, kScratch, kTails>(a, k, pl.cuts[blk * K + k], pl.cuts[(blk + 1) * K + k], false, false,
                                          out, r0, tl);
      }
      finish();
      block_epilogue(a, out, r0, r1);
      if (kDrain) {
        pending.step(pending.left);  // what this block's tiles did not drain
        pending = Drain<Out>{a.dst + r0 * a.cols, out, (r1 - r0) * a.cols};
        half ^= 1;
      }
      done(r0, r1, static_cast<const std::remove_pointer_t<Out>*>(out));
    }
    if (kDrain) {
      pending.step(pending.left);
      stream_fence();
    }
    leave();
  }
}

// Whether some offset but the identity has no pair (a Skip's inactive
// offsets, ApplyArgs::pairs): where apply_blocks fetches rows ahead.
template <typename Args>
inline bool skips_offsets(const Args& a) {
  const PairList& pl = a.pairs;
  const int64_t K = pl.kernel_volume, blocks = (a.num_rows + kBlockRows - 1) / kBlockRows;
  for (int64_t k = 0; k < K; ++k)
    if (k != pl.identity && pl.cuts[k] == pl.cuts[blocks * K + k]) return true;
  return false;
}

// kAhead: apply_blocks fetches rows ahead (a whole-panel product whose
// pairs skip offsets, summed in place).
template <typename T, bool kScratch, bool kAhead = false>
void apply_impl(const ApplyArgs<T>& a) {
  constexpr int64_t NR = nr<T>();
  const int64_t c_in = a.transpose ? a.cols : a.kc, c_out = a.transpose ? a.kc : a.cols;
  pack_weights(a, c_in, c_out);
  const int64_t np = panels<T>(a.cols);
  const auto none = [](int64_t) { return false; };
  const int64_t kc = a.kc;
  // Tiles across every panel (tile_panels_full): whole panels, and a last
  // one of a vector (kLastOne) or, in the AVX-512 build, of part of one
  // (kPart, its lanes `tail`).
  const auto full = [&a, np, kc](auto last_one, auto part, unsigned tail) {
    return [&a, np, kc, tail](auto height, int64_t k, const T* const* arow, T* const* crow, int, bool first) {
      const T* wk = a.wpack + k * np * kc * NR;
      tile_panels_full<T, decltype(last_one)::value, decltype(height)::value, decltype(part)::value>(
          np, [kc](int64_t) { return kc; }, [](int64_t) { return [](int64_t i) { return i; }; },
          [wk, kc](int64_t j) { return wk + j * kc * NR; }, arow, crow, a.bias, first, tail);
    };
  };
  if (a.cols % NR == 0) {
    apply_blocks<kMR, kScratch, true, kAhead>(a, none, full(Vectors<0>(), Vectors<0>(), 0u));
  } else if (tiles_whole_panels<T>(a.cols)) {
    apply_blocks<kMR, kScratch, true, kAhead>(a, none, full(Vectors<1>(), Vectors<0>(), 0u));
  } else if constexpr (PS_CONV_VEC_BYTES == 64 && kIsa == Isa::avx512) {
    // A last panel of part of a vector, in masked loads and stores: on an
    // AMD Zen 5 (KITTI sweep, one thread, forward) C = 40 7.6 -> 5.5 ms, 56
    // 11.9 -> 9.1, 24 5.49 -> 2.6 (bench/RESULTS.md stop 50).
    const int64_t rem = a.cols % NR;
    const unsigned tail = (1u << (rem % lanes<T>())) - 1u;
    if (rem < lanes<T>())
      apply_blocks<kMR, kScratch, true, kAhead>(a, none, full(Vectors<0>(), Vectors<1>(), tail));
    else
      apply_blocks<kMR, kScratch, true, kAhead>(a, none, full(Vectors<0>(), Vectors<2>(), tail));
  } else {  // elsewhere every tile through micro (a scratch tile copied in and out)
    const T zero[NR] = {};
    const auto tile = [&a, &zero, np](int64_t k, const T* const* arow, T* const* crow, int mr, bool first) {
      const T* wk = a.wpack + k * np * a.kc * NR;
      for (int64_t j = 0; j < np; ++j) {
        T* c[kMR];
        for (int r = 0; r < kMR; ++r) c[r] = crow[r] + j * NR;
        const int64_t ncols = a.cols - j * NR < NR ? a.cols - j * NR : NR;
        const T* init = first ? (a.bias ? a.bias + j * NR : zero) : nullptr;
        micro<T, 1, true>(a.kc, arow, wk + j * a.kc * NR, c, mr, ncols, init);
      }
    };
    apply_blocks<kMR, kScratch>(a, none, tile);
  }
}

// The kernel, summing in place or (a.blocks set) in scratch blocks.
template <typename T>
void apply_either(const ApplyArgs<T>& a) {
  if (a.blocks)
    apply_impl<T, true>(a);
  else if (skips_offsets(a))  // apply_impl fetches ahead only where its tiles take whole panels
    apply_impl<T, false, true>(a);
  else
    apply_impl<T, false>(a);
}

// C[r][j] += sum_q x[q][m0 + r] * B[q][j] for skip_rows <= r < kMR, j <
// ncols; x[q] = xp[q] (rows read in place), B packed (q, NR), NV vectors read.
template <typename T, int NV>
inline void micro_wg_nv(int64_t n, const T* const* xp, int64_t m0, const T* __restrict b, T* c, int64_t ldc,
                        int skip_rows, int64_t ncols) {
  typedef typename Vec<T>::type V;
  constexpr int L = lanes<T>();
  constexpr int64_t NR = nr<T>();
  V acc0[kMR], acc1[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = V{};
  for (int64_t q = 0; q < n; ++q) {
    const T* __restrict xr = xp[q] + m0;
    const V b0 = vload(b + q * NR), b1 = NV > 1 ? vload(b + q * NR + L) : V{};
    const T* x[kMR];
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) x[r] = xr + r;
    tile_step<T, NV>(acc0, acc1, b0, b1, x, 0);
  }
  T* rows[kMR];
  for (int r = 0; r < kMR; ++r) rows[r] = c + r * ldc;
  tile_add<T, NV>(acc0, acc1, rows, skip_rows, kMR, ncols);
}

template <typename T>
inline void micro_wg(int64_t n, const T* const* xp, int64_t m0, const T* __restrict b, T* c, int64_t ldc,
                     int skip_rows, int64_t ncols) {
  if (ncols <= lanes<T>())
    micro_wg_nv<T, 1>(n, xp, m0, b, c, ldc, skip_rows, ncols);
  else
    micro_wg_nv<T, 2>(n, xp, m0, b, c, ldc, skip_rows, ncols);
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
// added in unit order. `pairs_of(k, lo, hi, ident, part, ap, bp)` adds the
// pairs [lo, hi) of offset k into part (scratch ap, bp: this thread's).
template <typename T, typename F>
void wgrad_units(const WgradArgs<T>& a, F pairs_of) {
  const int64_t K = a.pairs.kernel_volume, psize = a.c_in * a.c_out;
  const int64_t per_thread = wgrad_scratch<T>(kIsa, a.c_in, a.c_out);
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
          if (hi > lo) pairs_of(k, lo, hi, ident, part + k * psize, ap, bp);
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

template <typename T>
void wgrad_impl(const WgradArgs<T>& a) {
  wgrad_units(a, [&a](int64_t, int64_t lo, int64_t hi, bool ident, T* part, T* ap, T* bp) {
    wgrad_pairs(a, lo, hi, ident, part, ap, bp);
  });
}

}  // namespace

// PS_CONV_KERNELS_ONLY: an includer that only borrows the helpers above
// (sparse_avx512.cpp, fused_bf16.cpp) leaves the entry points to the
// build's own file.
#ifndef PS_CONV_KERNELS_ONLY
void apply(const ApplyArgs<float>& a) { apply_either(a); }
void apply(const ApplyArgs<double>& a) { apply_either(a); }
void wgrad(const WgradArgs<float>& a) { wgrad_impl(a); }
void wgrad(const WgradArgs<double>& a) { wgrad_impl(a); }
#endif
