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
#include "conv/pages.h"
#include "conv/sparse.h"
#include "isa_arg.h"

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

// buf[g * rows + i] = src[idx[start[g] + i]], zero rows past len[g].
void gather(py::array src, carray<int64_t> idx, carray<int64_t> start, carray<int64_t> len, int64_t rows,
            py::array buf, int num_threads) {
  const int nt = threads(num_threads);
  check_rows(src, "src", false);
  check_rows(buf, "buf", true);
  check_same_dtype(src, buf, "src", "buf");
  const Segments seg = check_segments(idx, start, len, rows, src.shape(0), nt);
  check_buffer(buf, seg.count, rows, src.shape(1));
  dispatch_float(src, "src", [&](auto zero) { gather_impl<decltype(zero)>(src, seg, rows, buf, nt); });
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
  dispatch_float(dst, "dst", [&](auto zero) { scatter_impl<decltype(zero)>(buf, seg, rows, dst, nt); });
}

// counts[k][p]: the rows c of W[k] (W[k].T when transpose) holding a nonzero
// in the columns of panel p (sparse_panel<T>() columns, the 32-byte builds'
// tiles): the vectors the vector-sparse kernels visit. One pass over the weight, no allocation
// beyond the result.
template <typename T>
void count_vectors(const T* w, int64_t K, int64_t c_in, int64_t c_out, bool transpose, int32_t* counts) {
  constexpr int64_t NR = conv::sparse_panel<T>();
  const int64_t rows = transpose ? c_out : c_in, np = conv::panels<T>(Isa::avx2, transpose ? c_in : c_out);
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
  dispatch_float(weight, "weight", [&](auto zero) {
    using T = decltype(zero);
    counts = py::array_t<int32_t>({K, conv::panels<T>(Isa::avx2, transpose ? c_in : c_out)});
    count_vectors(static_cast<const T*>(weight.data()), K, c_in, c_out, transpose, counts.mutable_data());
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
    ptr_.assign(1, 0);
    for (int64_t k = 0; k < K; ++k) ptr_.push_back(ptr_.back() + (k == identity ? 0 : pp[k + 1] - pp[k]));
    const int64_t Q = ptr_.back();
    store_ = std::make_shared<Storage>();
    store_->fwd_row.reset(new int32_t[Q > 0 ? Q : 1]);
    store_->fwd_col.reset(new int32_t[Q > 0 ? Q : 1]);
    fwd_row_ = store_->fwd_row.get();
    fwd_col_ = store_->fwd_col.get();
    fwd_cuts_.assign((blocks(num_out) + 1) * K, 0);
    bwd_cuts_.assign((blocks(num_in) + 1) * K, 0);
    // One pass per offset: bounds, order both ways, the copy by output row
    // and the block cuts both ways (valid where the order holds).
    std::vector<Scan> scan(static_cast<size_t>(K));
    {
      py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t k = 0; k < K; ++k) scan[k] = scan_offset(in, out, pp, k);
    }
    // Errors in pair order, whatever the thread count.
    int64_t bad_in = P, bad_out = P;
    for (const Scan& sc : scan) {
      bad_in = std::min(bad_in, sc.bad_in);
      bad_out = std::min(bad_out, sc.bad_out);
    }
    if (bad_in < P)
      value_error("in_idx[" + std::to_string(bad_in) + "] = " + std::to_string(in[bad_in]) + " outside [0, " +
                  std::to_string(num_in) + ")");
    if (bad_out < P)
      value_error("out_idx[" + std::to_string(bad_out) + "] = " + std::to_string(out[bad_out]) + " outside [0, " +
                  std::to_string(num_out) + ")");
    if (identity >= 0 && !(num_in == num_out && pp[identity + 1] - pp[identity] == num_in && scan[identity].ident))
      value_error("the pairs of offset " + std::to_string(identity) + " are not the identity");
    bool all_sorted = true;
    for (int64_t k = 0; k < K; ++k) all_sorted = all_sorted && (k == identity || (scan[k].out_sorted && scan[k].in_sorted));
    if (all_sorted) {
      // The usual map (between key-sorted coords): the pairs by input row
      // are the same pairs in the same order, so the backward shares them.
      bwd_row_ = fwd_col_;
      bwd_col_ = fwd_row_;
      return;
    }
    sort_pairs(in, out, pp, scan, nt);
  }
  // The plan of the transposed (adjoint) map, inputs and outputs swapped:
  // this plan's arrays and cuts with the two directions exchanged (the pairs
  // by input row are the transposed map's pairs by output row). No pass
  // over the pairs.
  ConvPlan transposed() const {
    ConvPlan t(*this);
    std::swap(t.num_in_, t.num_out_);
    std::swap(t.fwd_row_, t.bwd_row_);
    std::swap(t.fwd_col_, t.bwd_col_);
    std::swap(t.fwd_cuts_, t.bwd_cuts_);
    return t;
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
               py::object isa, bool relu, py::object active, bool vector) const {
    const Isa use = isa_arg(isa);
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
    apply(feats, weight, has_bias ? &b : nullptr, out, false, num_threads, use, relu, Skip(*this, active, false),
          vector);
  }

  // The bf16 inference forward: feats and weight hold bf16 bits (int16 or
  // uint16 arrays), bias and out float32; products summed in float32.
  void forward_bf16(py::array feats, py::array weight, py::object bias, py::array out, int num_threads,
                    bool relu) const {
    if (!conv::bf16_runs())
      value_error("forward_bf16 needs AVX-512 with AVX512-BF16; this CPU (or build) runs: " + runnable_isas());
    check_rows(feats, "feats", false);
    check_rows(out, "out", true);
    check_weight(weight, feats.shape(1), out.shape(1));
    rows_are(feats, num_in_, "feats", "num_in");
    rows_are(out, num_out_, "out", "num_out");
    check_bf16_bits(feats, "feats");
    check_bf16_bits(weight, "weight");
    if (!out.dtype().is(py::dtype::of<float>())) value_error("out must be float32");
    py::array b;
    if (!bias.is_none()) {
      b = py::array::ensure(bias);
      if (!b || !b.dtype().is(py::dtype::of<float>())) value_error("bias must be a float32 array or None");
      check_1d(b, out.shape(1), "bias");
      if (!is_c_contiguous(b)) value_error("bias must be C-contiguous");
    }
    if (out.shape(1) == 0 || out.shape(0) == 0) return;
    conv::prefer_huge_pages(out.mutable_data(), size_t(out.nbytes()));
    conv::ApplyBf16Args a{static_cast<const uint16_t*>(feats.data()), static_cast<const uint16_t*>(weight.data()),
                          bias.is_none() ? nullptr : static_cast<const float*>(b.data()),
                          static_cast<float*>(out.mutable_data()), feats.shape(1), out.shape(1), out.shape(0),
                          pairs_fwd(), threads(num_threads), relu};
    py::gil_scoped_release release;
    conv::apply_bf16(a);
  }

  // grad_feats = sum over offsets o of grad_feats[in_idx] += grad[out_idx] @ weight[o]^T.
  void backward_input(py::array grad, py::array weight, py::array grad_feats, int num_threads,
                      py::object isa, py::object active, bool vector) const {
    const Isa use = isa_arg(isa);
    check_apply(grad, "grad", grad_feats, "grad_feats", weight, true);
    apply(grad, weight, nullptr, grad_feats, true, num_threads, use, false, Skip(*this, active, true), vector);
  }

  // grad_weight[o] = feats[in_idx]^T @ grad[out_idx] for every offset o.
  // `active` as in forward (a skipped offset's gradient is zero); `mask`
  // (K, C_in, C_out) or None: only the vectors (offset, input channel,
  // panel of columns) where the mask holds a nonzero are computed.
  void backward_weight(py::array feats, py::array grad, py::array grad_weight, int num_threads,
                       py::object isa, py::object active, py::object mask) const {
    const Isa use = isa_arg(isa);
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
    dispatch_float(feats, "feats", [&](auto zero) {
      run_wgrad<decltype(zero)>(feats, grad, grad_weight, num_threads, use, skip, mp);
    });
  }

 private:
  static int64_t blocks(int64_t rows) { return (rows + conv::kBlockRows - 1) / conv::kBlockRows; }

  // What one pass over the pairs of an offset found: the first pair out of
  // bounds on either side (P: none), whether each side strictly increases,
  // and for the identity offset whether its pairs are (i, i).
  struct Scan {
    int64_t bad_in, bad_out;
    bool in_sorted, out_sorted, ident;
  };

  // The pass of offset k: checks, the copy into the forward arrays and the
  // cuts of both directions (the copy and the cuts hold where the order
  // does; sort_pairs redoes the others). No Python: runs in a parallel region.
  Scan scan_offset(const int64_t* in, const int64_t* out, const int64_t* pp, int64_t k) {
    const int64_t lo = pp[k], hi = pp[k + 1], P = pp[kernel_volume()], K = kernel_volume();
    const uint64_t n_in = uint64_t(num_in_), n_out = uint64_t(num_out_);
    Scan sc{P, P, true, true, true};
    bool bad = false;
    if (k == identity_) {
      for (int64_t i = lo; i < hi; ++i) {
        bad |= (uint64_t(in[i]) >= n_in) | (uint64_t(out[i]) >= n_out);
        sc.ident &= (out[i] == i - lo) & (in[i] == i - lo);
      }
    } else {
      int32_t* __restrict row = store_->fwd_row.get() + ptr_[k];
      int32_t* __restrict col = store_->fwd_col.get() + ptr_[k];
      int64_t* __restrict fcuts = fwd_cuts_.data();
      int64_t* __restrict bcuts = bwd_cuts_.data();
      const int64_t base = ptr_[k] - lo, nb_out = blocks(num_out_), nb_in = blocks(num_in_);
      int64_t b_out = 0, b_in = 0, next_out = 0, next_in = 0, prev_out = -1, prev_in = -1;
      bool out_sorted = true, in_sorted = true;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = out[i], n = in[i];
        bad |= (uint64_t(n) >= n_in) | (uint64_t(o) >= n_out);
        out_sorted &= o > prev_out;
        in_sorted &= n > prev_in;
        prev_out = o;
        prev_in = n;
        row[i - lo] = int32_t(o);
        col[i - lo] = int32_t(n);
        if (o >= next_out) {  // a new block of output rows starts at this pair
          for (; b_out <= nb_out && b_out * conv::kBlockRows <= o; ++b_out) fcuts[b_out * K + k] = base + i;
          next_out = b_out * conv::kBlockRows;
        }
        if (n >= next_in) {
          for (; b_in <= nb_in && b_in * conv::kBlockRows <= n; ++b_in) bcuts[b_in * K + k] = base + i;
          next_in = b_in * conv::kBlockRows;
        }
      }
      for (; b_out <= nb_out; ++b_out) fcuts[b_out * K + k] = base + hi;
      for (; b_in <= nb_in; ++b_in) bcuts[b_in * K + k] = base + hi;
      sc.out_sorted = out_sorted;
      sc.in_sorted = in_sorted;
    }
    if (bad)  // the first pair out of bounds on each side
      for (int64_t i = lo; i < hi; ++i) {
        if (uint64_t(in[i]) >= n_in) sc.bad_in = std::min(sc.bad_in, i);
        if (uint64_t(out[i]) >= n_out) sc.bad_out = std::min(sc.bad_out, i);
      }
    return sc;
  }

  // The rare map whose pairs are not sorted both ways within every offset:
  // the backward gets its own arrays, and every offset out of order on a side
  // is stable-sorted there (a repeated row ends the plan) and its cuts redone.
  void sort_pairs(const int64_t* in, const int64_t* out, const int64_t* pp, const std::vector<Scan>& scan, int nt) {
    const int64_t K = kernel_volume(), P = pp[K], Q = ptr_.back();
    store_->bwd_row.reset(new int32_t[Q > 0 ? Q : 1]);
    store_->bwd_col.reset(new int32_t[Q > 0 ? Q : 1]);
    bwd_row_ = store_->bwd_row.get();
    bwd_col_ = store_->bwd_col.get();
    std::vector<int64_t> repeated(2 * K, -1), order(2 * P);
    {
      py::gil_scoped_release release;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t t = 0; t < 2 * K; ++t) {
        const int64_t k = t / 2, lo = pp[k], n = pp[k + 1] - lo, dst = ptr_[k];
        if (k == identity_) continue;
        const bool by_input = t % 2;
        const bool sorted = by_input ? scan[k].in_sorted : scan[k].out_sorted;
        if (sorted && !by_input) continue;  // copied by the scan already
        int32_t* row = (by_input ? store_->bwd_row : store_->fwd_row).get() + dst;
        repeated[t] = sorted_copy(by_input ? in + lo : out + lo, by_input ? out + lo : in + lo, n, !sorted, row,
                                  (by_input ? store_->bwd_col : store_->fwd_col).get() + dst,
                                  order.data() + (by_input ? P : 0) + lo);
        if (!sorted) block_cuts(row - dst, k, by_input ? num_in_ : num_out_, by_input ? bwd_cuts_ : fwd_cuts_);
      }
    }
    for (int64_t t = 0; t < 2 * K; ++t)
      if (repeated[t] >= 0)
        value_error("offset " + std::to_string(t / 2) + " pairs " + (t % 2 ? "input" : "output") + " row " +
                    std::to_string(repeated[t]) + " twice");
  }

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
  // b = 0 .. blocks (one merge walk over the offset's sorted rows).
  void block_cuts(const int32_t* row, int64_t k, int64_t num_rows, std::vector<int64_t>& cuts) const {
    const int64_t K = kernel_volume(), nb = blocks(num_rows), end = ptr_[k + 1];
    int64_t i = ptr_[k];
    for (int64_t b = 0; b <= nb; ++b) {
      while (i < end && row[i] < b * conv::kBlockRows) ++i;
      cuts[b * K + k] = b == nb ? end : i;
    }
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
             int num_threads, Isa isa, bool relu, const Skip& skip, bool vector) const {
    dispatch_float(src, transpose ? "grad" : "feats", [&](auto zero) {
      run_apply<decltype(zero)>(src, weight, bias, dst, transpose, num_threads, isa, relu, skip, vector);
    });
  }

  static void check_bf16_bits(const py::array& a, const char* name) {
    if (a.itemsize() != 2 || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u'))
      value_error(std::string(name) + " must hold bf16 bits as int16 or uint16; got " +
                  std::string(py::str(a.dtype())));
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
                 bool transpose, int num_threads, Isa isa, bool relu, const Skip& skip, bool vector) const {
    const int64_t kc = src.shape(1), cols = dst.shape(1), K = kernel_volume();
    if (cols == 0 || dst.shape(0) == 0) return;
    conv::prefer_huge_pages(dst.mutable_data(), size_t(dst.nbytes()));
    const T* b = bias ? static_cast<const T*>(bias->data()) : nullptr;
    conv::ApplyArgs<T> a{static_cast<const T*>(src.data()), static_cast<const T*>(weight.data()), b,
                         static_cast<T*>(dst.mutable_data()), nullptr, kc, cols, dst.shape(0), transpose,
                         skip.pairs(), threads(num_threads), relu};
    if (vector) {
      const int64_t lists = K * conv::panels<T>(Isa::avx2, cols);
      std::vector<int32_t> idx(std::max<int64_t>(1, lists * kc)), count(std::max<int64_t>(1, lists));
      py::gil_scoped_release release;
      conv::apply_sparse(conv::SparseApplyArgs<T>{a, idx.data(), count.data()}, isa);
      return;
    }
    py::gil_scoped_release release;
    conv::apply(a, isa);
  }

  template <typename T>
  void run_wgrad(const py::array& feats, const py::array& grad, py::array& grad_weight, int num_threads,
                 Isa isa, const Skip& skip, const py::array* mask) const {
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
    std::vector<T> partials(num_units * K * c_in * c_out);
    conv::WgradArgs<T> a{static_cast<const T*>(feats.data()), static_cast<const T*>(grad.data()),
                         static_cast<T*>(grad_weight.mutable_data()), partials.data(), nullptr,
                         units.data(), num_units, c_in, c_out, num_out_, skip.pairs(), nt};
    if (mask) {
      const int64_t lists = K * conv::panels<T>(Isa::avx2, c_out);
      std::vector<int32_t> idx(std::max<int64_t>(1, lists * c_in)), count(std::max<int64_t>(1, lists));
      const conv::MaskedWgradArgs<T> m{a, static_cast<const T*>(mask->data()), idx.data(), count.data()};
      py::gil_scoped_release release;
      conv::wgrad_masked(m, isa);
      return;
    }
    py::gil_scoped_release release;
    conv::wgrad(a, isa);
  }

  conv::PairList pairs_fwd() const {
    return {fwd_row_, fwd_col_, ptr_.data(), fwd_cuts_.data(), kernel_volume(), identity_};
  }
  conv::PairList pairs_bwd() const {
    return {bwd_row_, bwd_col_, ptr_.data(), bwd_cuts_.data(), kernel_volume(), identity_};
  }

  int64_t num_in_, num_out_, identity_;
  std::vector<int64_t> ptr_, fwd_cuts_, bwd_cuts_;
  // The int32 pairs, shared with the transposed plan. By input row: the
  // forward arrays themselves (bwd_row_ = fwd_col_, bwd_col_ = fwd_row_)
  // when every offset is sorted both ways, else bwd_row / bwd_col.
  struct Storage {
    std::unique_ptr<int32_t[]> fwd_row, fwd_col, bwd_row, bwd_col;  // uninitialised until filled
  };
  std::shared_ptr<Storage> store_;
  const int32_t *fwd_row_ = nullptr, *fwd_col_ = nullptr, *bwd_row_ = nullptr, *bwd_col_ = nullptr;
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
  m.def("conv_isa", [] { return std::string(isa_name(best_isa())); },
        "Instruction set the fused convolution kernels use on this CPU by default: 'avx512', 'avx2' or 'generic'.");
  m.def("conv_bf16", [] { return conv::bf16_runs(); },
        "Whether the bf16 inference forward (AVX512-BF16 vdpbf16ps) runs on this CPU.");
  m.def("runnable_isas", [] {
        std::vector<std::string> names;
        for (int i = kNumIsas - 1; i >= 0; --i)
          if (isa_runs(Isa(i))) names.push_back(isa_name(Isa(i)));
        return names;
      },
        "The kernel builds (conv and SpMM) this CPU runs, widest first: what an `isa` argument accepts.");
  py::class_<ConvPlan>(m, "ConvPlan",
                       "The pairs of a kernel map checked and laid out once for the fused convolution kernels.")
      .def(py::init<carray<int64_t>, carray<int64_t>, carray<int64_t>, int64_t, int64_t, int64_t, int>(),
           py::arg("in_idx"), py::arg("out_idx"), py::arg("ptr"), py::arg("num_in"), py::arg("num_out"),
           py::arg("identity"), py::arg("num_threads") = 1)
      .def("transposed", &ConvPlan::transposed,
           "The plan of the transposed map (inputs and outputs swapped), sharing this plan's pairs: no pass "
           "over them.")
      .def_property_readonly("num_in", &ConvPlan::num_in)
      .def_property_readonly("num_out", &ConvPlan::num_out)
      .def_property_readonly("kernel_volume", &ConvPlan::kernel_volume)
      .def_property_readonly("identity", &ConvPlan::identity)
      .def_property_readonly("num_pairs", &ConvPlan::num_pairs)
      .def("forward", &ConvPlan::forward, py::arg("feats"), py::arg("weight"), py::arg("bias"), py::arg("out"),
           py::arg("num_threads"), py::arg("isa") = py::none(), py::arg("relu") = false,
           py::arg("active") = py::none(), py::arg("vector") = false,
           "out = bias + sum over offsets o of feats[in_idx] @ weight[o] added at out_idx (bias None: zero). "
           "Writes every row of out. isa: None (the best build that runs here), 'generic', 'avx2' or 'avx512' "
           "(ValueError where it does not run); True/False: the former `portable` flag. relu: out = max(out, 0) "
           "in the kernel's epilogue (inference). active: None or K flags (uint8), the offsets run (the others' "
           "pairs are left out); vector: the vector-sparse kernels (only the weight rows of each column panel "
           "that hold a nonzero are visited; they run in the 32-byte builds).")
      .def("forward_bf16", &ConvPlan::forward_bf16, py::arg("feats"), py::arg("weight"), py::arg("bias"),
           py::arg("out"), py::arg("num_threads"), py::arg("relu") = false,
           "Inference forward in bf16 (AVX512-BF16): feats and weight hold bf16 bits (int16/uint16 arrays), bias "
           "(float32 or None) and out float32; products summed in float32. ValueError where the CPU lacks it.")
      .def("backward_input", &ConvPlan::backward_input, py::arg("grad"), py::arg("weight"), py::arg("grad_feats"),
           py::arg("num_threads"), py::arg("isa") = py::none(), py::arg("active") = py::none(),
           py::arg("vector") = false,
           "grad_feats = sum over offsets o of grad[out_idx] @ weight[o].T added at in_idx. Writes every row. "
           "isa, active, vector: as in forward.")
      .def("backward_weight", &ConvPlan::backward_weight, py::arg("feats"), py::arg("grad"),
           py::arg("grad_weight"), py::arg("num_threads"), py::arg("isa") = py::none(),
           py::arg("active") = py::none(), py::arg("mask") = py::none(),
           "grad_weight[o] = feats[in_idx].T @ grad[out_idx] for every offset o. Writes all of grad_weight: zero "
           "for an offset active leaves out and, with mask (K, C_in, C_out), for every vector (offset, input "
           "channel, panel of 16 float32 / 8 float64 columns) where the mask is all zero; the entries computed "
           "equal the dense ones bit for bit.");
}

}  // namespace ps
