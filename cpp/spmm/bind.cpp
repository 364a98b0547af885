// SpMM bindings: Y (M, N) = S (M, K) @ X (K, N) for a sparse S in CSR, BSR,
// N:M or EIE layout (kernels.h documents the arrays). Every index is checked
// here, before any parallel region; then the GIL is released and the build of
// the kernels the `isa` argument picks runs (isa_arg.h: None, the best one).
#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "array.h"
#include "bind.h"
#include "isa_arg.h"
#include "spmm/args.h"

namespace ps {
namespace {

using spmm::BsrArgs;
using spmm::CsrArgs;
using spmm::EieArgs;
using spmm::NmArgs;

// True for float64, false for float32 (the kernels' Args carry the flag);
// ValueError otherwise.
bool float_kind(const py::array& a, const char* name) {
  return dispatch_float(a, name, [](auto zero) { return sizeof(zero) == sizeof(double); });
}

// `a` as a C-contiguous array (a copy where it is not). ValueError naming it
// where numpy cannot make the copy (a broadcast view of more bytes than the
// process may hold): array::ensure returns a null handle then, never to be
// dereferenced.
py::array contiguous(const py::array& a, const char* name) {
  py::array out = py::array::ensure(a, py::array::c_style);
  if (!out)
    value_error(std::string(name) + " is not C-contiguous and numpy could not copy it into a C-contiguous array "
                "(shape " + shape_str(a) + ", " + dtype_str(a) + ", " + std::to_string(a.nbytes()) + " bytes)");
  return out;
}

// Unsigned index array of width 1, 2, 4 or 8 bytes; returns the width.
int index_width(const py::array& a, const char* name) {
  if (a.dtype().kind() != 'u' || (a.itemsize() != 1 && a.itemsize() != 2 && a.itemsize() != 4 &&
                                  a.itemsize() != 8))
    value_error(std::string(name) + " must be an unsigned integer array (uint8/16/32/64); got " +
                dtype_str(a));
  return int(a.itemsize());
}

uint64_t max_index(const void* p, int width, int64_t n) {
  uint64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t v;
    switch (width) {
      case 1: v = static_cast<const uint8_t*>(p)[i]; break;
      case 2: v = static_cast<const uint16_t*>(p)[i]; break;
      case 4: v = static_cast<const uint32_t*>(p)[i]; break;
      default: v = static_cast<const uint64_t*>(p)[i]; break;
    }
    m = std::max(m, v);
  }
  return m;
}

// ptr must be 1-D of length rows + 1, start at 0, never decrease, end at total.
// rows is any count >= 0 (an empty product's M may be near 2^63): the length
// is compared without computing rows + 1.
void check_ptr(const carray<int64_t>& ptr, int64_t rows, int64_t total, const char* name) {
  if (ptr.ndim() != 1 || ptr.shape(0) - 1 != rows)
    value_error(std::string(name) + " must be 1-D of length " + std::to_string(uint64_t(rows) + 1) +
                "; got shape " + shape_str(ptr));
  const int64_t* p = ptr.data();
  if (p[0] != 0) value_error(std::string(name) + "[0] must be 0; got " + std::to_string(p[0]));
  for (int64_t i = 0; i < rows; ++i)
    if (p[i + 1] < p[i])
      value_error(std::string(name) + " must be non-decreasing; decreases at " +
                  std::to_string(i + 1));
  if (p[rows] != total)
    value_error(std::string(name) + "[-1] must equal " + std::to_string(total) + "; got " +
                std::to_string(p[rows]));
}

void check_x(const py::array& X, int64_t K) {
  if (X.ndim() != 2 || X.shape(0) != K)
    value_error("dense must be 2-D with " + std::to_string(K) + " rows (K, N); got shape " +
                shape_str(X));
}

// One kernel of the build `isa`, without the GIL.
template <typename Args>
void run_kernel(Isa isa, const Args& a, void (*generic)(const Args&), void (*avx2)(const Args&),
                void (*avx512)(const Args&)) {
  py::gil_scoped_release release;
  (isa == Isa::avx512 ? avx512 : isa == Isa::avx2 ? avx2 : generic)(a);
}

// ceil(n / d) for n >= 0, d >= 1, without the overflow of (n + d - 1) / d.
int64_t ceil_div(int64_t n, int64_t d) { return n / d + (n % d != 0); }

// The (M, N) output of a product (the kernels write all of it), its size in
// bytes checked first: ValueError naming M (m_from: where it comes from) and
// N (dense's columns) where it passes what an array can hold, as numpy
// would refuse it but without naming them, or the 2^36 bytes (64 GiB) the
// package allows a dense result (pointsparse.tensor.MAX_DENSE_BYTES, which
// the formats check before calling here).
constexpr int64_t kMaxOutputBytes = int64_t(1) << 36;

py::array output_of(int64_t M, int64_t N, bool f64, const char* m_from) {
  int64_t bytes = 0;
  const std::string what = "the output (M, N) = (" + std::to_string(M) + ", " + std::to_string(N) + ") of " +
                           (f64 ? "float64" : "float32");
  if (__builtin_mul_overflow(M, N, &bytes) || __builtin_mul_overflow(bytes, int64_t(f64 ? 8 : 4), &bytes))
    value_error(what + " would take more than 2^63 bytes (M from " + m_from + ", N from dense)");
  if (bytes > kMaxOutputBytes)
    value_error(what + " would take " + std::to_string(bytes) + " bytes, past the 2^36-byte (64 GiB) limit on a "
                "dense result (M from " + m_from + ", N from dense)");
  return f64 ? py::array(py::array_t<double>({M, N})) : py::array(py::array_t<float>({M, N}));
}

void check_nonneg(int64_t v, const char* name) {
  if (v < 0) value_error(std::string(name) + " must be >= 0; got " + std::to_string(v));
}

py::array csr_spmm(carray<int64_t> row_ptr, py::array col, py::array val, py::array X, int64_t K,
                   py::object isa, int num_threads) {
  const Isa use = isa_arg(isa);
  check_nonneg(K, "K");
  if (row_ptr.ndim() != 1 || row_ptr.shape(0) < 1)
    value_error("row_ptr must be 1-D of length M + 1 >= 1; got shape " + shape_str(row_ptr));
  const int64_t M = row_ptr.shape(0) - 1;
  const bool f64 = float_kind(val, "values");
  check_same_dtype(val, X, "values", "dense");
  const int width = index_width(col, "col_idx");
  col = contiguous(col, "col_idx");
  val = contiguous(val, "values");
  X = contiguous(X, "dense");
  if (col.ndim() != 1) value_error("col_idx must be 1-D; got shape " + shape_str(col));
  const int64_t nnz = col.shape(0);
  check_1d(val, nnz, "values");
  check_ptr(row_ptr, M, nnz, "row_ptr");
  check_x(X, K);
  if (nnz > 0 && max_index(col.data(), width, nnz) >= uint64_t(K))
    value_error("col_idx must be < K = " + std::to_string(K));
  const int64_t N = X.shape(1);
  py::array Y = output_of(M, N, f64, "row_ptr");
  CsrArgs a{row_ptr.data(), col.data(), width, val.data(), f64, M, K, N, X.data(),
            Y.mutable_data(), threads(num_threads)};
  run_kernel(use, a, spmm::generic::csr, spmm::avx2::csr, spmm::avx512::csr);
  return Y;
}

// out (N_out, C_out) += per pair p: S (C_out, C_in) @ feats[in_idx[p]], into
// row out_idx[p]; out must be a writable C-contiguous array of the values'
// dtype (updated in place), out_idx distinct.
void csr_conv_accumulate(carray<int64_t> row_ptr, py::array col, py::array val, py::array feats,
                         carray<int64_t> in_idx, carray<int64_t> out_idx, py::array out,
                         py::object isa, int num_threads) {
  const Isa use = isa_arg(isa);
  if (row_ptr.ndim() != 1 || row_ptr.shape(0) < 1)
    value_error("row_ptr must be 1-D of length C_out + 1 >= 1; got shape " + shape_str(row_ptr));
  const int64_t C_out = row_ptr.shape(0) - 1;
  const bool f64 = float_kind(val, "values");
  check_same_dtype(val, feats, "values", "feats");
  check_same_dtype(val, out, "values", "out");
  const int width = index_width(col, "col_idx");
  col = contiguous(col, "col_idx");
  val = contiguous(val, "values");
  feats = contiguous(feats, "feats");
  if (col.ndim() != 1) value_error("col_idx must be 1-D; got shape " + shape_str(col));
  const int64_t nnz = col.shape(0);
  check_1d(val, nnz, "values");
  check_ptr(row_ptr, C_out, nnz, "row_ptr");
  if (feats.ndim() != 2) value_error("feats must be 2-D (N_in, C_in); got shape " + shape_str(feats));
  const int64_t N_in = feats.shape(0), C_in = feats.shape(1);
  if (nnz > 0 && max_index(col.data(), width, nnz) >= uint64_t(C_in))
    value_error("col_idx must be < C_in = " + std::to_string(C_in));
  if (out.ndim() != 2 || out.shape(1) != C_out)
    value_error("out must be (N_out, " + std::to_string(C_out) + "); got shape " + shape_str(out));
  if (!(out.flags() & py::array::c_style) || !out.writeable())
    value_error("out must be a writable C-contiguous array");
  // Blocks of out are written in parallel while feats and values are read
  // (both C-contiguous here: copies where they were not), and the pairs and
  // the CSR structure, checked once below and read again by the kernel.
  apart(feats, "feats", out, "out");
  apart(val, "values", out, "out");
  apart(row_ptr, "row_ptr", out, "out");
  apart(col, "col_idx", out, "out");
  apart(in_idx, "in_idx", out, "out");
  apart(out_idx, "out_idx", out, "out");
  const int64_t N_out = out.shape(0);
  check_1d(in_idx, in_idx.ndim() == 1 ? in_idx.shape(0) : -1, "in_idx");
  const int64_t P = in_idx.shape(0);
  check_1d(out_idx, P, "out_idx");
  const int64_t* ii = in_idx.data();
  const int64_t* oi = out_idx.data();
  // Distinct out_idx: a table of N_out flags, which out backs where it has
  // columns (N_out x C_out entries). An out without columns backs none of its
  // rows (any N_out is free): its pairs' rows are compared sorted instead.
  const bool table = C_out > 0;
  std::vector<char> seen(table ? size_t(N_out) : 0, 0);
  for (int64_t p = 0; p < P; ++p) {
    if (ii[p] < 0 || ii[p] >= N_in)
      value_error("in_idx[" + std::to_string(p) + "] = " + std::to_string(ii[p]) +
                  " is outside [0, " + std::to_string(N_in) + ")");
    if (oi[p] < 0 || oi[p] >= N_out)
      value_error("out_idx[" + std::to_string(p) + "] = " + std::to_string(oi[p]) +
                  " is outside [0, " + std::to_string(N_out) + ")");
    if (table && seen[size_t(oi[p])]++) value_error("out_idx must hold distinct rows (one pair per output)");
  }
  if (!table) {
    std::vector<int64_t> rows(oi, oi + P);
    std::sort(rows.begin(), rows.end());
    if (std::adjacent_find(rows.begin(), rows.end()) != rows.end())
      value_error("out_idx must hold distinct rows (one pair per output)");
  }
  spmm::CsrConvArgs a{row_ptr.data(), col.data(), width, val.data(), f64, C_out, C_in, P,
                      feats.data(), ii, oi, out.mutable_data(), threads(num_threads)};
  run_kernel(use, a, spmm::generic::csr_conv, spmm::avx2::csr_conv, spmm::avx512::csr_conv);
}

py::array bsr_spmm(carray<int64_t> block_ptr, py::array block_col, py::array val, py::array X,
                   int64_t M, int64_t K, py::object isa, int num_threads) {
  const Isa use = isa_arg(isa);
  check_nonneg(M, "M");
  check_nonneg(K, "K");
  const bool f64 = float_kind(val, "values");
  check_same_dtype(val, X, "values", "dense");
  const int width = index_width(block_col, "block_col");
  block_col = contiguous(block_col, "block_col");
  val = contiguous(val, "values");
  X = contiguous(X, "dense");
  if (val.ndim() != 3 || val.shape(1) < 1 || val.shape(2) < 1)
    value_error("values must be (num_blocks, block_rows, block_cols) with blocks of at least "
                "1 x 1; got shape " + shape_str(val));
  const int64_t nb = val.shape(0), br = val.shape(1), bc = val.shape(2);
  const int64_t MB = ceil_div(M, br), KB = ceil_div(K, bc);
  check_1d(block_col, nb, "block_col");
  check_ptr(block_ptr, MB, nb, "block_ptr");
  check_x(X, K);
  if (nb > 0 && max_index(block_col.data(), width, nb) >= uint64_t(KB))
    value_error("block_col must be < ceil(K / block_cols) = " + std::to_string(KB));
  const int64_t N = X.shape(1);
  py::array Y = output_of(M, N, f64, "the argument M");
  BsrArgs a{block_ptr.data(), block_col.data(), width, val.data(), f64, M, K, N, br, bc, X.data(),
            Y.mutable_data(), threads(num_threads)};
  run_kernel(use, a, spmm::generic::bsr, spmm::avx2::bsr, spmm::avx512::bsr);
  return Y;
}

int64_t nm_kept_per_row(int64_t K, int64_t n, int64_t m) {
  return (K / m) * n + std::min(n, K % m);
}

py::array nm_spmm(py::array_t<uint8_t, py::array::c_style> positions, py::array val, int bits,
                  int64_t n, int64_t m, py::array X, int64_t K, py::object isa, int num_threads) {
  const Isa use = isa_arg(isa);
  check_nonneg(K, "K");
  if (!(n >= 1 && n <= m && m <= 16))
    value_error("n:m must satisfy 1 <= n <= m <= 16; got " + std::to_string(n) + ":" +
                std::to_string(m));
  if (bits < 0 || bits > 4 || (int64_t(1) << bits) < m)
    value_error("bits must be in 0..4 with 2^bits >= m = " + std::to_string(m) + "; got " +
                std::to_string(bits));
  const bool f64 = float_kind(val, "values");
  check_same_dtype(val, X, "values", "dense");
  val = contiguous(val, "values");
  X = contiguous(X, "dense");
  const int64_t L = nm_kept_per_row(K, n, m);
  check_2d(val, L, "values");
  const int64_t M = val.shape(0);
  const int64_t total_bits = M * L * bits;
  check_1d(positions, (total_bits + 7) / 8, "positions");
  check_x(X, K);
  const uint8_t* pos = positions.data();
  for (int64_t t = 0; t < M * L; ++t) {
    int64_t p = 0;
    if (bits) {
      const int64_t bit = t * bits;
      unsigned v = unsigned(pos[bit >> 3]) >> (bit & 7);
      if ((bit & 7) + bits > 8) v |= unsigned(pos[(bit >> 3) + 1]) << (8 - (bit & 7));
      p = int64_t(v & ((1u << bits) - 1u));
    }
    const int64_t q = t % L;
    if (p >= m || (q / n) * m + p >= K)
      value_error("positions entry " + std::to_string(t) + " = " + std::to_string(p) +
                  " points outside its group (m = " + std::to_string(m) + ", K = " +
                  std::to_string(K) + ")");
  }
  const int64_t N = X.shape(1);
  py::array Y = output_of(M, N, f64, "values");
  NmArgs a{pos, val.data(), f64, M, K, N, L, n, m, bits, X.data(), Y.mutable_data(),
           threads(num_threads)};
  run_kernel(use, a, spmm::generic::nm, spmm::avx2::nm, spmm::avx512::nm);
  return Y;
}

py::array eie_spmm(carray<int64_t> col_ptr, py::array_t<uint8_t, py::array::c_style> rel_idx,
                   py::array val, py::array X, int64_t M, py::object isa, int num_threads) {
  const Isa use = isa_arg(isa);
  check_nonneg(M, "M");
  if (col_ptr.ndim() != 2 || col_ptr.shape(0) < 1 || col_ptr.shape(1) < 1)
    value_error("col_ptr must be (num_pe, K + 1) with num_pe >= 1; got shape " +
                shape_str(col_ptr));
  const int64_t P = col_ptr.shape(0), K = col_ptr.shape(1) - 1;
  const bool f64 = float_kind(val, "values");
  check_same_dtype(val, X, "values", "dense");
  val = contiguous(val, "values");
  X = contiguous(X, "dense");
  const int64_t* cp = col_ptr.data();
  check_1d(val, -1, "values");
  // Each PE's entries are counted against len(values) as they are added, so
  // that no sum of them overflows (nor a length compared with a wrapped one).
  const int64_t num_values = val.shape(0);
  int64_t entries = 0, bytes = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* c = cp + p * (K + 1);
    if (c[0] != 0) value_error("col_ptr[" + std::to_string(p) + ", 0] must be 0");
    for (int64_t k = 0; k < K; ++k)
      if (c[k + 1] < c[k])
        value_error("col_ptr[" + std::to_string(p) + "] must be non-decreasing");
    if (c[K] > num_values - entries)
      value_error("col_ptr[:, -1] must add up to len(values) = " + std::to_string(num_values) + "; col_ptr[" +
                  std::to_string(p) + ", -1] = " + std::to_string(c[K]) + " takes the sum past it");
    entries += c[K];
    bytes += (c[K] + 1) / 2;
  }
  check_1d(val, entries, "values");
  check_1d(rel_idx, bytes, "rel_idx");
  check_x(X, K);
  // Decode every column once: each local row must stay inside its PE.
  const uint8_t* z = rel_idx.data();
  int64_t byte0 = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* c = cp + p * (K + 1);
    const int64_t rows = p < M ? ceil_div(M - p, P) : 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t local = -1;
      for (int64_t e = c[k]; e < c[k + 1]; ++e) local += ((z[byte0 + (e >> 1)] >> ((e & 1) * 4)) & 15) + 1;
      if (local >= rows)
        value_error("rel_idx of PE " + std::to_string(p) + ", column " + std::to_string(k) +
                    " reaches local row " + std::to_string(local) + " >= " + std::to_string(rows));
    }
    byte0 += (c[K] + 1) / 2;
  }
  const int64_t N = X.shape(1);
  py::array Y = output_of(M, N, f64, "the argument M");
  EieArgs a{cp, z, val.data(), f64, M, K, N, P, X.data(), Y.mutable_data(), threads(num_threads)};
  run_kernel(use, a, spmm::generic::eie, spmm::avx2::eie, spmm::avx512::eie);
  return Y;
}

}  // namespace

void bind_spmm(py::module_& m) {
  m.def("spmm_isa", [] { return std::string(isa_name(best_isa())); },
        "Instruction set the SpMM kernels use on this CPU by default ('avx512', 'avx2' or 'generic').");
  m.def("csr_spmm", &csr_spmm, py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"),
        py::arg("dense"), py::arg("K"), py::arg("isa"), py::arg("num_threads"),
        "CSR (M, K) @ dense (K, N) -> (M, N); col_idx unsigned 1/2/4/8 bytes.");
  m.def("csr_conv_accumulate", &csr_conv_accumulate, py::arg("row_ptr"), py::arg("col_idx"),
        py::arg("values"), py::arg("feats"), py::arg("in_idx"), py::arg("out_idx"), py::arg("out"),
        py::arg("isa"), py::arg("num_threads"),
        "One sparse-conv offset: out[out_idx] += (S @ feats[in_idx].T).T, S (C_out, C_in) CSR.");
  m.def("bsr_spmm", &bsr_spmm, py::arg("block_ptr"), py::arg("block_col"), py::arg("values"),
        py::arg("dense"), py::arg("M"), py::arg("K"), py::arg("isa"), py::arg("num_threads"),
        "BSR (M, K) with (nb, br, bc) blocks @ dense (K, N) -> (M, N).");
  m.def("nm_spmm", &nm_spmm, py::arg("positions"), py::arg("values"), py::arg("bits"),
        py::arg("n"), py::arg("m"), py::arg("dense"), py::arg("K"), py::arg("isa"),
        py::arg("num_threads"), "N:M (M, K) @ dense (K, N) -> (M, N); packed positions.");
  m.def("eie_spmm", &eie_spmm, py::arg("col_ptr"), py::arg("rel_idx"), py::arg("values"),
        py::arg("dense"), py::arg("M"), py::arg("isa"), py::arg("num_threads"),
        "EIE (M, K) over P PEs @ dense (K, N) -> (M, N); 4-bit relative row indices.");
}

}  // namespace ps
