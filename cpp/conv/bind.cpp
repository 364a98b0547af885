// Bindings of the convolution's gather and scatter-add kernels. Buffers are
// written in place: the Python side preallocates them (torch tensors viewed as
// numpy arrays), so every output is checked here for dtype, layout and shape.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "array.h"
#include "bind.h"
#include "conv/fused.h"
#include "conv/gather_scatter.h"
#include "conv/sparse.h"

namespace ps {
namespace {

bool is_c_contiguous(const py::array& a) { return a.flags() & py::array::c_style; }

// A float32/float64 2-D C-contiguous array; `writeable` for outputs.
void check_rows(const py::array& a, const char* name, bool writeable) {
  check_2d(a, -1, name);
  if (!is_c_contiguous(a)) value_error(std::string(name) + " must be C-contiguous");
  if (writeable && !a.writeable()) value_error(std::string(name) + " must be writeable");
}

void check_same_dtype(const py::array& a, const py::array& b, const char* na, const char* nb) {
  if (!a.dtype().is(b.dtype()))
    value_error(std::string(na) + " and " + nb + " must have the same dtype");
}

// Segments of `idx` as validated raw pointers; every index in a segment lies
// in [0, limit). Checked before any parallel region writes memory.
struct Segments {
  const int64_t* idx;
  const int64_t* start;
  const int64_t* len;
  int64_t count;
};

Segments check_segments(const carray<int64_t>& idx, const carray<int64_t>& start,
                        const carray<int64_t>& len, int64_t rows, int64_t limit, int nt) {
  check_1d(idx, idx.ndim() == 1 ? idx.shape(0) : -1, "idx");
  check_1d(start, start.ndim() == 1 ? start.shape(0) : -1, "start");
  check_1d(len, start.shape(0), "len");
  if (rows < 0) value_error("rows must be >= 0");
  const int64_t p = idx.shape(0), g = start.shape(0);
  const int64_t *s = start.data(), *l = len.data(), *ix = idx.data();
  for (int64_t i = 0; i < g; ++i) {
    if (l[i] < 0 || l[i] > rows || s[i] < 0 || s[i] > p - l[i])
      value_error("segment " + std::to_string(i) + " (start " + std::to_string(s[i]) + ", len " +
                  std::to_string(l[i]) + ") lies outside idx (" + std::to_string(p) +
                  " entries) or exceeds rows " + std::to_string(rows));
  }
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t* seg = ix + s[i];
      const int64_t n = l[i];
#pragma omp parallel for num_threads(nt) reduction(+ : bad) schedule(static) if (n > 65536)
      for (int64_t j = 0; j < n; ++j) bad += (seg[j] < 0) | (seg[j] >= limit);
    }
  }
  if (bad) value_error("idx holds " + std::to_string(bad) + " indices outside [0, " + std::to_string(limit) + ")");
  return {ix, s, l, g};
}

template <typename T>
void gather_impl(const py::array& src, const Segments& seg, int64_t rows, py::array& buf, int nt) {
  const T* x = static_cast<const T*>(src.data());
  T* b = static_cast<T*>(buf.mutable_data());
  const int64_t c = src.shape(1);
  py::gil_scoped_release release;
  gather_segments<T>(x, c, seg.idx, seg.start, seg.len, seg.count, rows, b, nt);
}

template <typename T>
void scatter_impl(const py::array& buf, const Segments& seg, int64_t rows, py::array& dst, int nt) {
  const T* b = static_cast<const T*>(buf.data());
  T* y = static_cast<T*>(dst.mutable_data());
  const int64_t c = dst.shape(1);
  py::gil_scoped_release release;
  scatter_add_segments<T>(b, c, seg.idx, seg.start, seg.len, seg.count, rows, y, nt);
}

void check_buffer(const py::array& buf, int64_t segments, int64_t rows, int64_t channels) {
  if (buf.shape(0) != segments * rows || buf.shape(1) != channels)
    value_error("buf must be (segments * rows, channels) = (" + std::to_string(segments * rows) + ", " +
                std::to_string(channels) + "); got " + shape_str(buf));
}

template <typename Fn32, typename Fn64>
void dispatch(const py::array& a, Fn32 f32, Fn64 f64) {
  if (a.dtype().is(py::dtype::of<float>()))
    f32();
  else if (a.dtype().is(py::dtype::of<double>()))
    f64();
  else
    value_error("feats must be float32 or float64; got dtype " + std::string(py::str(a.dtype())));
}

// buf[g * rows + i] = src[idx[start[g] + i]], zero rows past len[g].
void gather(py::array src, carray<int64_t> idx, carray<int64_t> start, carray<int64_t> len, int64_t rows,
            py::array buf, int num_threads) {
  const int nt = threads(num_threads);
  check_rows(src, "src", false);
  check_rows(buf, "buf", true);
  check_same_dtype(src, buf, "src", "buf");
  const Segments seg = check_segments(idx, start, len, rows, src.shape(0), nt);
  check_buffer(buf, seg.count, rows, src.shape(1));
  dispatch(src, [&] { gather_impl<float>(src, seg, rows, buf, nt); },
           [&] { gather_impl<double>(src, seg, rows, buf, nt); });
}

// dst[idx[start[g] + i]] += buf[g * rows + i], segment after segment.
void scatter_add(py::array buf, carray<int64_t> idx, carray<int64_t> start, carray<int64_t> len, int64_t rows,
                 py::array dst, int num_threads) {
  const int nt = threads(num_threads);
  check_rows(buf, "buf", false);
  check_rows(dst, "dst", true);
  check_same_dtype(buf, dst, "buf", "dst");
  const Segments seg = check_segments(idx, start, len, rows, dst.shape(0), nt);
  check_buffer(buf, seg.count, rows, dst.shape(1));
  dispatch(dst, [&] { scatter_impl<float>(buf, seg, rows, dst, nt); },
           [&] { scatter_impl<double>(buf, seg, rows, dst, nt); });
}

// counts[k][p]: the rows c of W[k] (W[k].T when transpose) holding a nonzero
// in the columns of panel p (nr<T>() columns): the vectors the
// vector-sparse kernels visit. One pass over the weight, no allocation
// beyond the result.
template <typename T>
void count_vectors(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose, int32_t* counts) {
  constexpr int64_t NR = conv::nr<T>();
  const int64_t rows = transpose ? c_out : c_in, np = conv::panels<T>(transpose ? c_in : c_out);
  std::vector<uint8_t> mark(rows * np);
  for (int64_t k = 0; k < K; ++k) {
    // One contiguous pass over W[k] (c, j): the vector of (c, j) is
    // (row c, panel j / NR), or transposed (row j, panel c / NR).
    std::fill(mark.begin(), mark.end(), uint8_t(0));
    const T* wk = w + k * c_in * c_out;
    for (int64_t c = 0; c < c_in; ++c) {
      const T* row = wk + c * c_out;
      if (transpose) {
        for (int64_t j = 0; j < c_out; ++j) mark[j * np + c / NR] |= row[j] != T(0);
        continue;
      }
      for (int64_t p = 0; p < np; ++p) {
        const int64_t n = std::min(NR, c_out - p * NR);
        bool nonzero = false;
        for (int64_t j = 0; j < n; ++j) nonzero |= row[p * NR + j] != T(0);
        mark[c * np + p] = nonzero;
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      int32_t n = 0;
      for (int64_t r = 0; r < rows; ++r) n += mark[r * np + p];
      counts[k * np + p] = n;
    }
  }
}

py::array_t<int32_t> weight_vectors(py::array weight, bool transpose) {
  if (weight.ndim() != 3 || !is_c_contiguous(weight))
    value_error("weight must be a C-contiguous (K, C_in, C_out) array; got shape " + shape_str(weight));
  const int64_t K = weight.shape(0), c_in = weight.shape(1), c_out = weight.shape(2);
  py::array_t<int32_t> counts;
  dispatch(weight, [&] {
    counts = py::array_t<int32_t>({K, conv::panels<float>(transpose ? c_in : c_out)});
    count_vectors(static_cast<const float*>(weight.data()), K, c_in, c_out, transpose, counts.mutable_data());
  }, [&] {
    counts = py::array_t<int32_t>({K, conv::panels<double>(transpose ? c_in : c_out)});
    count_vectors(static_cast<const double*>(weight.data()), K, c_in, c_out, transpose, counts.mutable_data());
  });
  return counts;
}

// The pairs of one kernel map, checked and laid out once for the fused
// kernels: per offset (the identity left out) the pairs sorted by output row
// (forward, weight gradient) and sorted by input row (input gradient), int32.
// Every call afterwards checks only the shapes of the tensors it is given.
class ConvPlan {
 public:
  ConvPlan(carray<int64_t> in_idx, carray<int64_t> out_idx, carray<int64_t> ptr, int64_t num_in, int64_t num_out,
           int64_t identity, int num_threads)
      : num_in_(num_in), num_out_(num_out), identity_(identity) {
    check_1d(in_idx, -1, "in_idx");
    check_1d(out_idx, in_idx.shape(0), "out_idx");
    check_1d(ptr, -1, "ptr");
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
    if (num_in < 0 || num_in > kMax) value_error("num_in must be in [0, 2^31); got " + std::to_string(num_in));
    if (num_out < 0 || num_out > kMax) value_error("num_out must be in [0, 2^31); got " + std::to_string(num_out));
    if (ptr.shape(0) < 1) value_error("ptr must hold kernel_volume + 1 >= 1 entries");
    const int64_t K = ptr.shape(0) - 1, P = in_idx.shape(0);
    const int64_t *pp = ptr.data(), *in = in_idx.data(), *out = out_idx.data();
    if (pp[0] != 0 || pp[K] != P) value_error("ptr must start at 0 and end at the number of pairs " + std::to_string(P));
    for (int64_t k = 0; k < K; ++k)
      if (pp[k + 1] < pp[k]) value_error("ptr must be non-decreasing (offset " + std::to_string(k) + ")");
    if (identity < -1 || identity >= K)
      value_error("identity must be -1 or an offset index in [0, " + std::to_string(K) + "); got " +
                  std::to_string(identity));
    const int nt = threads(num_threads, P);
    // Bounds first (the first bad pair is reported, whatever the thread count).
    int64_t bad_in = P, bad_out = P;
    {
      py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad_in, bad_out)
      for (int64_t i = 0; i < P; ++i) {
        if ((in[i] < 0) | (in[i] >= num_in)) bad_in = std::min(bad_in, i);
        if ((out[i] < 0) | (out[i] >= num_out)) bad_out = std::min(bad_out, i);
      }
    }
    if (bad_in < P)
      value_error("in_idx[" + std::to_string(bad_in) + "] = " + std::to_string(in[bad_in]) + " outside [0, " +
                  std::to_string(num_in) + ")");
    if (bad_out < P)
      value_error("out_idx[" + std::to_string(bad_out) + "] = " + std::to_string(out[bad_out]) + " outside [0, " +
                  std::to_string(num_out) + ")");
    if (identity >= 0) {
      const int64_t lo = pp[identity], n = pp[identity + 1] - lo;
      bool ok = num_in == num_out && n == num_in;
      for (int64_t i = 0; ok && i < n; ++i) ok = in[lo + i] == i && out[lo + i] == i;
      if (!ok) value_error("the pairs of offset " + std::to_string(identity) + " are not the identity");
    }
    ptr_.assign(1, 0);
    for (int64_t k = 0; k < K; ++k) ptr_.push_back(ptr_.back() + (k == identity ? 0 : pp[k + 1] - pp[k]));
    const int64_t Q = ptr_.back();
    fwd_row_.reset(new int32_t[Q > 0 ? Q : 1]);
    fwd_col_.reset(new int32_t[Q > 0 ? Q : 1]);
    bwd_row_.reset(new int32_t[Q > 0 ? Q : 1]);
    bwd_col_.reset(new int32_t[Q > 0 ? Q : 1]);
    // Per offset and side: sorted already (copy) or not (stable sort through
    // `order`, allocated only then); a repeated row ends the plan.
    std::vector<char> unsorted(2 * K, 0);
    std::vector<int64_t> repeated(2 * K, -1), order;
    {
      py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t t = 0; t < 2 * K; ++t) {
        const int64_t k = t / 2, lo = pp[k], n = pp[k + 1] - lo;
        if (k == identity) continue;
        const int64_t* key = (t % 2 ? in : out) + lo;
        for (int64_t i = 1; i < n; ++i)
          if (key[i - 1] >= key[i]) {
            unsorted[t] = 1;
            break;
          }
      }
      if (std::find(unsorted.begin(), unsorted.end(), 1) != unsorted.end()) order.resize(2 * P);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t t = 0; t < 2 * K; ++t) {
        const int64_t k = t / 2, lo = pp[k], n = pp[k + 1] - lo, dst = ptr_[k];
        if (k == identity) continue;
        const bool by_input = t % 2;
        repeated[t] = sorted_copy(by_input ? in + lo : out + lo, by_input ? out + lo : in + lo, n, unsorted[t],
                                  (by_input ? bwd_row_ : fwd_row_).get() + dst,
                                  (by_input ? bwd_col_ : fwd_col_).get() + dst,
                                  unsorted[t] ? order.data() + (by_input ? P : 0) + lo : nullptr);
      }
    }
    for (int64_t t = 0; t < 2 * K; ++t)
      if (repeated[t] >= 0)
        value_error("offset " + std::to_string(t / 2) + " pairs " + (t % 2 ? "input" : "output") + " row " +
                    std::to_string(repeated[t]) + " twice");
    fwd_cuts_ = block_cuts(fwd_row_.get(), num_out, nt);
    bwd_cuts_ = block_cuts(bwd_row_.get(), num_in, nt);
  }

  // The pairs of one call that skips offsets: the cuts of a skipped offset
  // made constant (no pairs in any block; O(blocks * K), no pair touched)
  // and its identity dropped. The map and the plan stay whole.
  class Skip {
   public:
    Skip(const ConvPlan& plan, const py::object& active, bool by_input) : pairs_(by_input ? plan.pairs_bwd() : plan.pairs_fwd()) {
      if (active.is_none()) return;
      const carray<uint8_t> flags = as_carray<uint8_t>(active, "active");
      const int64_t K = pairs_.kernel_volume;
      check_1d(flags, K, "active");
      const int64_t n = (by_input ? plan.num_in_ : plan.num_out_) + conv::kBlockRows - 1;
      const int64_t blocks = n / conv::kBlockRows;
      cuts_.assign(pairs_.cuts, pairs_.cuts + (blocks + 1) * K);
      for (int64_t k = 0; k < K; ++k) {
        if (flags.data()[k]) continue;
        for (int64_t b = 0; b <= blocks; ++b) cuts_[b * K + k] = plan.ptr_[k];
        if (k == pairs_.identity) pairs_.identity = -1;
      }
      pairs_.cuts = cuts_.data();
    }
    const conv::PairList& pairs() const { return pairs_; }

   private:
    conv::PairList pairs_;
    std::vector<int64_t> cuts_;
  };

  int64_t num_in() const { return num_in_; }
  int64_t num_out() const { return num_out_; }
  int64_t kernel_volume() const { return int64_t(ptr_.size()) - 1; }
  int64_t identity() const { return identity_; }
  // Pairs of the map, the identity's included.
  int64_t num_pairs() const { return ptr_.back() + (identity_ >= 0 ? num_in_ : 0); }

  // out = bias + sum over offsets o of out[out_idx] += feats[in_idx] @ weight[o].
  // `active`: None (every offset) or K flags, the offsets run (a skipped
  // offset's pairs are left out); `vector`: the vector-sparse kernels.
  void forward(py::array feats, py::array weight, py::object bias, py::array out, int num_threads,
               bool portable, py::object active, bool vector) const {
    check_apply(feats, "feats", out, "out", weight, false);
    py::array b;
    const bool has_bias = !bias.is_none();
    if (has_bias) {
      b = py::array::ensure(bias);
      if (!b) value_error("bias must be an array or None");
      check_1d(b, out.shape(1), "bias");
      if (!is_c_contiguous(b)) value_error("bias must be C-contiguous");
      same_dtype(b, feats, out);
    }
    apply(feats, weight, has_bias ? &b : nullptr, out, false, num_threads, portable, Skip(*this, active, false),
          vector);
  }

  // grad_feats = sum over offsets o of grad_feats[in_idx] += grad[out_idx] @ weight[o]^T.
  void backward_input(py::array grad, py::array weight, py::array grad_feats, int num_threads,
                      bool portable, py::object active, bool vector) const {
    check_apply(grad, "grad", grad_feats, "grad_feats", weight, true);
    apply(grad, weight, nullptr, grad_feats, true, num_threads, portable, Skip(*this, active, true), vector);
  }

  // grad_weight[o] = feats[in_idx]^T @ grad[out_idx] for every offset o.
  // `active` as in forward (a skipped offset's gradient is zero); `mask`
  // (K, C_in, C_out) or None: only the vectors (offset, input channel,
  // panel of columns) where the mask holds a nonzero are computed.
  void backward_weight(py::array feats, py::array grad, py::array grad_weight, int num_threads,
                       bool portable, py::object active, py::object mask) const {
    check_rows(feats, "feats", false);
    check_rows(grad, "grad", false);
    rows_are(feats, num_in_, "feats", "num_in");
    rows_are(grad, num_out_, "grad", "num_out");
    check_weight(grad_weight, feats.shape(1), grad.shape(1), "grad_weight");
    if (!grad_weight.writeable()) value_error("grad_weight must be writeable");
    same_dtype(feats, grad, grad_weight);
    py::array m;
    if (!mask.is_none()) {
      m = py::array::ensure(mask);
      if (!m) value_error("mask must be an array or None");
      check_weight(m, feats.shape(1), grad.shape(1), "mask");
      same_dtype(m, feats, grad);
    }
    const Skip skip(*this, active, false);
    const py::array* mp = mask.is_none() ? nullptr : &m;
    dispatch(feats, [&] { run_wgrad<float>(feats, grad, grad_weight, num_threads, portable, skip, mp); },
             [&] { run_wgrad<double>(feats, grad, grad_weight, num_threads, portable, skip, mp); });
  }

 private:
  // Copy the pairs of one offset sorted by `key` (strictly increasing): a
  // plain copy when sorted already, else a stable sort through `order` (n
  // entries). Returns a key that repeats, or -1. No Python, no allocation:
  // runs inside a parallel region.
  static int64_t sorted_copy(const int64_t* key, const int64_t* val, int64_t n, bool unsorted, int32_t* row,
                             int32_t* col, int64_t* order) {
    if (!unsorted) {
      for (int64_t i = 0; i < n; ++i) {
        row[i] = int32_t(key[i]);
        col[i] = int32_t(val[i]);
      }
      return -1;
    }
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order, order + n, [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    for (int64_t i = 0; i < n; ++i) {
      if (i && key[order[i]] == key[order[i - 1]]) return key[order[i]];
      row[i] = int32_t(key[order[i]]);
      col[i] = int32_t(val[order[i]]);
    }
    return -1;
  }

  // cuts[b * K + k]: first pair of offset k with row >= b * kBlockRows, for
  // b = 0 .. blocks (one merge walk per offset).
  std::vector<int64_t> block_cuts(const int32_t* row, int64_t num_rows, int nt) const {
    const int64_t K = kernel_volume(), blocks = (num_rows + conv::kBlockRows - 1) / conv::kBlockRows;
    std::vector<int64_t> cuts((blocks + 1) * K);
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t k = 0; k < K; ++k) {
      int64_t i = ptr_[k];
      const int64_t end = ptr_[k + 1];
      for (int64_t b = 0; b <= blocks; ++b) {
        const int64_t bound = b * conv::kBlockRows;
        while (i < end && row[i] < bound) ++i;
        cuts[b * K + k] = b == blocks ? end : i;
      }
    }
    return cuts;
  }

  // The arrays of one direction: src read (rows on the read side), dst
  // written (rows on the written side), weight (K, C_in, C_out); transpose:
  // the input-gradient direction (read side = outputs, written = inputs).
  void check_apply(const py::array& src, const char* src_name, const py::array& dst, const char* dst_name,
                   const py::array& weight, bool transpose) const {
    check_rows(src, src_name, false);
    check_rows(dst, dst_name, true);
    check_weight(weight, transpose ? dst.shape(1) : src.shape(1), transpose ? src.shape(1) : dst.shape(1));
    rows_are(src, transpose ? num_out_ : num_in_, src_name, transpose ? "num_out" : "num_in");
    rows_are(dst, transpose ? num_in_ : num_out_, dst_name, transpose ? "num_in" : "num_out");
    same_dtype(src, weight, dst);
  }

  void apply(const py::array& src, const py::array& weight, const py::array* bias, py::array& dst, bool transpose,
             int num_threads, bool portable, const Skip& skip, bool vector) const {
    dispatch(src, [&] { run_apply<float>(src, weight, bias, dst, transpose, num_threads, portable, skip, vector); },
             [&] { run_apply<double>(src, weight, bias, dst, transpose, num_threads, portable, skip, vector); });
  }

  static void rows_are(const py::array& a, int64_t rows, const char* name, const char* what) {
    if (a.shape(0) != rows)
      value_error(std::string(name) + " must have " + what + " = " + std::to_string(rows) + " rows; got shape " +
                  shape_str(a));
  }

  void check_weight(const py::array& w, int64_t c_in, int64_t c_out, const char* name = "weight") const {
    const int64_t K = kernel_volume();
    if (w.ndim() != 3 || w.shape(0) != K || w.shape(1) != c_in || w.shape(2) != c_out)
      value_error(std::string(name) + " must be (kernel_volume, C_in, C_out) = (" + std::to_string(K) + ", " +
                  std::to_string(c_in) + ", " + std::to_string(c_out) + "); got " + shape_str(w));
    if (!is_c_contiguous(w)) value_error(std::string(name) + " must be C-contiguous");
  }

  static void same_dtype(const py::array& a, const py::array& b, const py::array& c) {
    if (!a.dtype().is(b.dtype()) || !a.dtype().is(c.dtype()))
      value_error("all arrays must have one dtype; got " + std::string(py::str(a.dtype())) + ", " +
                  std::string(py::str(b.dtype())) + ", " + std::string(py::str(c.dtype())));
  }

  template <typename T>
  void run_apply(const py::array& src, const py::array& weight, const py::array* bias, py::array& dst,
                 bool transpose, int num_threads, bool portable, const Skip& skip, bool vector) const {
    const int64_t kc = src.shape(1), cols = dst.shape(1), K = kernel_volume();
    if (cols == 0 || dst.shape(0) == 0) return;
    std::vector<T> wpack(std::max<int64_t>(1, conv::wpack_size<T>(K, kc, cols)));
    const T* b = bias ? static_cast<const T*>(bias->data()) : nullptr;
    conv::ApplyArgs<T> a{static_cast<const T*>(src.data()), static_cast<const T*>(weight.data()), b,
                         static_cast<T*>(dst.mutable_data()), wpack.data(), kc, cols, dst.shape(0), transpose,
                         skip.pairs(), threads(num_threads)};
    if (vector) {
      const int64_t lists = K * conv::panels<T>(cols);
      std::vector<int32_t> idx(std::max<int64_t>(1, lists * kc)), count(std::max<int64_t>(1, lists));
      py::gil_scoped_release release;
      conv::apply_sparse(conv::SparseApplyArgs<T>{a, idx.data(), count.data()}, portable);
      return;
    }
    py::gil_scoped_release release;
    conv::apply(a, portable);
  }

  template <typename T>
  void run_wgrad(const py::array& feats, const py::array& grad, py::array& grad_weight, int num_threads,
                 bool portable, const Skip& skip, const py::array* mask) const {
    const int64_t c_in = feats.shape(1), c_out = grad.shape(1), K = kernel_volume();
    if (c_in == 0 || c_out == 0 || K == 0) return;
    if (num_out_ == 0 || (num_pairs() == 0 && identity_ < 0)) {
      T* gw = static_cast<T*>(grad_weight.mutable_data());
      std::fill(gw, gw + K * c_in * c_out, T(0));
      return;
    }
    // Units: consecutive row blocks holding >= `target` pairs: kUnitPairs, or
    // less on small maps so that there are about kMinUnits units to share
    // among threads; their number is capped so that all partials fit in
    // kPartialBytes. A function of the map and the channels only.
    const int64_t blocks = (num_out_ + conv::kBlockRows - 1) / conv::kBlockRows;
    const int64_t partial_bytes = K * c_in * c_out * int64_t(sizeof(T));
    const int64_t max_units = std::max<int64_t>(1, conv::kPartialBytes / partial_bytes);
    const int64_t target = std::max(std::min(conv::kUnitPairs, (num_pairs() + conv::kMinUnits - 1) / conv::kMinUnits),
                                    (num_pairs() + max_units - 1) / max_units);
    std::vector<int64_t> units{0};
    int64_t acc = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t k = 0; k < K; ++k) acc += fwd_cuts_[(b + 1) * K + k] - fwd_cuts_[b * K + k];
      if (identity_ >= 0) acc += std::min(conv::kBlockRows, num_out_ - b * conv::kBlockRows);
      if (acc >= target || b + 1 == blocks) {
        units.push_back(b + 1);
        acc = 0;
      }
    }
    const int64_t num_units = int64_t(units.size()) - 1;
    const int nt = int(std::min<int64_t>(threads(num_threads), std::max<int64_t>(num_units, 1)));
    std::vector<T> partials(num_units * K * c_in * c_out), scratch(nt * conv::wgrad_scratch<T>(c_in, c_out));
    conv::WgradArgs<T> a{static_cast<const T*>(feats.data()), static_cast<const T*>(grad.data()),
                         static_cast<T*>(grad_weight.mutable_data()), partials.data(), scratch.data(),
                         units.data(), num_units, c_in, c_out, num_out_, skip.pairs(), nt};
    if (mask) {
      const int64_t lists = K * conv::panels<T>(c_out);
      std::vector<int32_t> idx(lists * c_in), count(lists);
      const conv::MaskedWgradArgs<T> m{a, static_cast<const T*>(mask->data()), idx.data(), count.data()};
      py::gil_scoped_release release;
      conv::wgrad_masked(m, portable);
      return;
    }
    py::gil_scoped_release release;
    conv::wgrad(a, portable);
  }

  conv::PairList pairs_fwd() const {
    return {fwd_row_.get(), fwd_col_.get(), ptr_.data(), fwd_cuts_.data(), kernel_volume(), identity_};
  }
  conv::PairList pairs_bwd() const {
    return {bwd_row_.get(), bwd_col_.get(), ptr_.data(), bwd_cuts_.data(), kernel_volume(), identity_};
  }

  int64_t num_in_, num_out_, identity_;
  std::vector<int64_t> ptr_, fwd_cuts_, bwd_cuts_;
  std::unique_ptr<int32_t[]> fwd_row_, fwd_col_, bwd_row_, bwd_col_;  // uninitialised until filled
};

}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_gather", &gather, py::arg("src"), py::arg("idx"), py::arg("start"), py::arg("len"),
        py::arg("rows"), py::arg("buf"), py::arg("num_threads"),
        "buf[g*rows+i] = src[idx[start[g]+i]] for i < len[g]; zero rows up to rows. In place.");
  m.def("conv_scatter_add", &scatter_add, py::arg("buf"), py::arg("idx"), py::arg("start"), py::arg("len"),
        py::arg("rows"), py::arg("dst"), py::arg("num_threads"),
        "dst[idx[start[g]+i]] += buf[g*rows+i] for i < len[g], segment by segment (indices unique within a "
        "segment); deterministic for any thread count. In place.");
  m.def("conv_weight_vectors", &weight_vectors, py::arg("weight"), py::arg("transpose") = false,
        "int32 (K, panels): per offset k and panel p of nr columns (16 float32, 8 float64), the rows of "
        "weight[k] (weight[k].T when transpose) holding a nonzero in the panel: the vectors the vector-sparse "
        "kernels visit.");
  m.def("conv_isa", [] { return std::string(conv::uses_avx2() ? "avx2" : "generic"); },
        "Instruction set the fused convolution kernels use on this CPU: 'avx2' or 'generic'.");
  py::class_<ConvPlan>(m, "ConvPlan",
                       "The pairs of a kernel map checked and laid out once for the fused convolution kernels.")
      .def(py::init<carray<int64_t>, carray<int64_t>, carray<int64_t>, int64_t, int64_t, int64_t, int>(),
           py::arg("in_idx"), py::arg("out_idx"), py::arg("ptr"), py::arg("num_in"), py::arg("num_out"),
           py::arg("identity"), py::arg("num_threads") = 1)
      .def_property_readonly("num_in", &ConvPlan::num_in)
      .def_property_readonly("num_out", &ConvPlan::num_out)
      .def_property_readonly("kernel_volume", &ConvPlan::kernel_volume)
      .def_property_readonly("identity", &ConvPlan::identity)
      .def_property_readonly("num_pairs", &ConvPlan::num_pairs)
      .def("forward", &ConvPlan::forward, py::arg("feats"), py::arg("weight"), py::arg("bias"), py::arg("out"),
           py::arg("num_threads"), py::arg("portable") = false, py::arg("active") = py::none(),
           py::arg("vector") = false,
           "out = bias + sum over offsets o of feats[in_idx] @ weight[o] added at out_idx (bias None: zero). "
           "Writes every row of out. active: None or K flags (uint8), the offsets run (the others' pairs are "
           "left out); vector: the vector-sparse kernels (only the weight rows of each column panel that hold a "
           "nonzero are visited).")
      .def("backward_input", &ConvPlan::backward_input, py::arg("grad"), py::arg("weight"), py::arg("grad_feats"),
           py::arg("num_threads"), py::arg("portable") = false, py::arg("active") = py::none(),
           py::arg("vector") = false,
           "grad_feats = sum over offsets o of grad[out_idx] @ weight[o].T added at in_idx. Writes every row. active, vector: as in forward.")
      .def("backward_weight", &ConvPlan::backward_weight, py::arg("feats"), py::arg("grad"),
           py::arg("grad_weight"), py::arg("num_threads"), py::arg("portable") = false,
           py::arg("active") = py::none(), py::arg("mask") = py::none(),
           "grad_weight[o] = feats[in_idx].T @ grad[out_idx] for every offset o. Writes all of grad_weight: zero "
           "for an offset active leaves out and, with mask (K, C_in, C_out), for every vector (offset, input "
           "channel, panel of nr columns) where the mask is all zero; the entries computed equal the dense ones "
           "bit for bit.");
}

}  // namespace ps
