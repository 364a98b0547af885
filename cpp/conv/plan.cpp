// The plan of a kernel map for the fused kernels, and the calls that run it
// (see plan.h).
#include "conv/plan.h"

#include <omp.h>

#include <algorithm>
#include <utility>

#include "conv/pages.h"
#include "conv/sparse.h"

namespace ps {
namespace conv {
namespace {

int64_t blocks(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

// Copy the pairs of one offset sorted by `key` (strictly increasing): a
// plain copy when sorted already, else a sort through `order` (n entries;
// std::sort, which allocates nothing, unlike std::stable_sort: keys of a valid
// offset are distinct, so stability changes nothing, and the smallest
// repeated key is the one reported either way). Returns a key that repeats,
// or -1. No allocation: runs inside a parallel region.
int64_t sorted_copy(const int64_t* key, const int64_t* val, int64_t n, bool unsorted, int32_t* row, int32_t* col,
                    int64_t* order) {
  if (!unsorted) {
    for (int64_t i = 0; i < n; ++i) {
      row[i] = int32_t(key[i]);
      col[i] = int32_t(val[i]);
    }
    return -1;
  }
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order, order + n, [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  for (int64_t i = 0; i < n; ++i) {
    if (i && key[order[i]] == key[order[i - 1]]) return key[order[i]];
    row[i] = int32_t(key[order[i]]);
    col[i] = int32_t(val[order[i]]);
  }
  return -1;
}

}  // namespace

// What one pass over the pairs of an offset found: the first pair out of
// bounds on either side (P: none), whether each side strictly increases,
// and for the identity offset whether its pairs are (i, i).
struct Plan::Scan {
  int64_t bad_in, bad_out;
  bool in_sorted, out_sorted, ident;
};

Plan::Plan(const int64_t* in, const int64_t* out, const int64_t* pp, int64_t K, int64_t num_in, int64_t num_out,
           int64_t identity, int nt, PlanStatus& status)
    : num_in_(num_in), num_out_(num_out), identity_(identity) {
  const int64_t P = pp[K];
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
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t k = 0; k < K; ++k) scan[k] = scan_offset(in, out, pp, k);
  // Errors in pair order, whatever the thread count.
  int64_t bad_in = P, bad_out = P;
  for (const Scan& sc : scan) {
    bad_in = std::min(bad_in, sc.bad_in);
    bad_out = std::min(bad_out, sc.bad_out);
  }
  if (bad_in < P || bad_out < P) {
    status.bad_in = bad_in < P ? bad_in : -1;
    status.bad_out = bad_out < P ? bad_out : -1;
    return;
  }
  if (identity >= 0 && !(num_in == num_out && pp[identity + 1] - pp[identity] == num_in && scan[identity].ident)) {
    status.not_identity = true;
    return;
  }
  bool all_sorted = true;
  for (int64_t k = 0; k < K; ++k) all_sorted = all_sorted && (k == identity || (scan[k].out_sorted && scan[k].in_sorted));
  if (all_sorted) {
    // The usual map (between key-sorted coords): the pairs by input row
    // are the same pairs in the same order, so the backward shares them.
    bwd_row_ = fwd_col_;
    bwd_col_ = fwd_row_;
    return;
  }
  sort_pairs(in, out, pp, scan, nt, status);
}

Plan Plan::transposed() const {
  Plan t(*this);
  std::swap(t.num_in_, t.num_out_);
  std::swap(t.fwd_row_, t.bwd_row_);
  std::swap(t.fwd_col_, t.bwd_col_);
  std::swap(t.fwd_cuts_, t.bwd_cuts_);
  return t;
}

PairList Plan::pairs(bool by_input) const {
  if (by_input) return {bwd_row_, bwd_col_, ptr_.data(), bwd_cuts_.data(), kernel_volume(), identity_};
  return {fwd_row_, fwd_col_, ptr_.data(), fwd_cuts_.data(), kernel_volume(), identity_};
}

// The pass of offset k: checks, the copy into the forward arrays and the
// cuts of both directions (the copy and the cuts hold where the order
// does; sort_pairs redoes the others). Runs in a parallel region.
Plan::Scan Plan::scan_offset(const int64_t* in, const int64_t* out, const int64_t* pp, int64_t k) {
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
        for (; b_out <= nb_out && b_out * kBlockRows <= o; ++b_out) fcuts[b_out * K + k] = base + i;
        next_out = b_out * kBlockRows;
      }
      if (n >= next_in) {
        for (; b_in <= nb_in && b_in * kBlockRows <= n; ++b_in) bcuts[b_in * K + k] = base + i;
        next_in = b_in * kBlockRows;
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
// is sorted there (a repeated row is reported) and its cuts redone.
void Plan::sort_pairs(const int64_t* in, const int64_t* out, const int64_t* pp, const std::vector<Scan>& scan, int nt,
                      PlanStatus& status) {
  const int64_t K = kernel_volume(), P = pp[K], Q = ptr_.back();
  store_->bwd_row.reset(new int32_t[Q > 0 ? Q : 1]);
  store_->bwd_col.reset(new int32_t[Q > 0 ? Q : 1]);
  bwd_row_ = store_->bwd_row.get();
  bwd_col_ = store_->bwd_col.get();
  std::vector<int64_t> repeated(2 * K, -1), order(2 * P);
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
  for (int64_t t = 0; t < 2 * K; ++t)
    if (repeated[t] >= 0) {
      status.repeated_offset = t / 2;
      status.repeated_row = repeated[t];
      status.repeated_by_input = t % 2;
      return;
    }
}

// cuts[b * K + k]: first pair of offset k with row >= b * kBlockRows, for
// b = 0 .. blocks (one merge walk over the offset's sorted rows).
void Plan::block_cuts(const int32_t* row, int64_t k, int64_t num_rows, std::vector<int64_t>& cuts) const {
  const int64_t K = kernel_volume(), nb = blocks(num_rows), end = ptr_[k + 1];
  int64_t i = ptr_[k];
  for (int64_t b = 0; b <= nb; ++b) {
    while (i < end && row[i] < b * kBlockRows) ++i;
    cuts[b * K + k] = b == nb ? end : i;
  }
}

Skip::Skip(const Plan& plan, bool by_input, const uint8_t* active) : pairs_(plan.pairs(by_input)) {
  if (!active) return;
  const int64_t K = pairs_.kernel_volume, nb = blocks(plan.rows(by_input));
  cuts_.assign(pairs_.cuts, pairs_.cuts + (nb + 1) * K);
  for (int64_t k = 0; k < K; ++k) {
    if (active[k]) continue;
    for (int64_t b = 0; b <= nb; ++b) cuts_[b * K + k] = plan.ptr()[k];
    if (k == pairs_.identity) pairs_.identity = -1;
  }
  pairs_.cuts = cuts_.data();
}

bool streams_output(const Plan& plan, const Skip& skip, bool transpose, bool vector) {
  const PairList& pl = skip.pairs();
  if (transpose || vector || plan.identity() < 0 || pl.identity >= 0) return false;
  const int64_t K = pl.kernel_volume, rows = plan.num_out(), nb = blocks(rows);
  int64_t run = 0;
  for (int64_t k = 0; k < K; ++k) run += pl.cuts[nb * K + k] - pl.cuts[k];
  return run <= rows;
}

template <typename T>
void run_apply(const Plan& plan, const T* src, const T* w, const T* bias, T* dst, int64_t kc, int64_t cols,
               bool transpose, const Skip& skip, int nt, Isa isa, bool relu, bool vector, const T* add) {
  const int64_t rows = plan.rows(transpose), K = plan.kernel_volume();
  if (cols == 0 || rows == 0) return;
  prefer_huge_pages(dst, size_t(rows * cols) * sizeof(T));
  ApplyArgs<T> a{src, w, bias, dst, nullptr, kc, cols, rows, transpose, skip.pairs(), nt, relu, add};
  a.stream = streams_output(plan, skip, transpose, vector);
  if (vector) {
    const int64_t lists = K * panels<T>(Isa::avx2, cols);
    std::vector<int32_t> idx(std::max<int64_t>(1, lists * kc)), count(std::max<int64_t>(1, lists));
    std::vector<int64_t> start(lists + 1);
    apply_sparse(SparseApplyArgs<T>{a, idx.data(), count.data(), start.data()}, isa);
    return;
  }
  apply(a, isa);
}

namespace {

// Units: consecutive row blocks holding >= `target` pairs: kUnitPairs, or
// less on small maps so that there are about kMinUnits units to share among
// threads; their number is capped so that all partials fit in kPartialBytes.
// A function of the map and the channels only.
std::vector<int64_t> wgrad_unit_bounds(const Plan& plan, int64_t partial_bytes) {
  const int64_t K = plan.kernel_volume(), num_out = plan.num_out(), pairs = plan.num_pairs();
  const int64_t* cuts = plan.pairs(false).cuts;
  const int64_t max_units = std::max<int64_t>(1, kPartialBytes / partial_bytes);
  const int64_t target = std::max(std::min(kUnitPairs, (pairs + kMinUnits - 1) / kMinUnits),
                                  (pairs + max_units - 1) / max_units);
  std::vector<int64_t> units{0};
  int64_t acc = 0;
  for (int64_t b = 0, nb = blocks(num_out); b < nb; ++b) {
    for (int64_t k = 0; k < K; ++k) acc += cuts[(b + 1) * K + k] - cuts[b * K + k];
    if (plan.identity() >= 0) acc += std::min(kBlockRows, num_out - b * kBlockRows);
    if (acc >= target || b + 1 == nb) {
      units.push_back(b + 1);
      acc = 0;
    }
  }
  return units;
}

}  // namespace

template <typename T>
void run_wgrad(const Plan& plan, const T* x, const T* g, T* grad_w, const T* mask, int64_t c_in, int64_t c_out,
               const Skip& skip, int nt, Isa isa) {
  const int64_t K = plan.kernel_volume();
  if (c_in == 0 || c_out == 0 || K == 0) return;
  if (plan.num_out() == 0 || (plan.num_pairs() == 0 && plan.identity() < 0)) {
    std::fill(grad_w, grad_w + K * c_in * c_out, T(0));
    return;
  }
  const std::vector<int64_t> units = wgrad_unit_bounds(plan, K * c_in * c_out * int64_t(sizeof(T)));
  const int64_t num_units = int64_t(units.size()) - 1;
  const int use = int(std::min<int64_t>(nt, std::max<int64_t>(num_units, 1)));
  std::vector<T> partials(num_units * K * c_in * c_out);
  WgradArgs<T> a{x, g, grad_w, partials.data(), nullptr, units.data(), num_units, c_in, c_out, plan.num_out(),
                 skip.pairs(), use};
  if (mask) {
    const int64_t lists = K * panels<T>(Isa::avx2, c_out);
    std::vector<int32_t> idx(std::max<int64_t>(1, lists * c_in)), count(std::max<int64_t>(1, lists));
    wgrad_masked(MaskedWgradArgs<T>{a, mask, idx.data(), count.data()}, isa);
    return;
  }
  wgrad(a, isa);
}

Bf16Execution run_apply_bf16(const Plan& plan, const uint16_t* src, const uint16_t* w, const float* bias,
                             float* dst, int64_t kc, int64_t cols, int nt, bool relu, uint16_t* dst_bf16,
                             double vector_density, const uint16_t* add, double tiles_width) {
  const int64_t rows = plan.num_out();
  if (cols == 0 || rows == 0) return Bf16Execution::dense;
  if (dst) prefer_huge_pages(dst, size_t(rows * cols) * sizeof(float));
  ApplyBf16Args a{src, w, bias, dst, kc, cols, rows, plan.pairs(false), nt, relu, dst_bf16, vector_density, add};
  a.tiles_width = tiles_width;
  return apply_bf16(a);
}

#define PS_CONV_PLAN_INSTANTIATE(T)                                                                               \
  template void run_apply<T>(const Plan&, const T*, const T*, const T*, T*, int64_t, int64_t, bool, const Skip&, \
                             int, Isa, bool, bool, const T*);                                              \
  template void run_wgrad<T>(const Plan&, const T*, const T*, T*, const T*, int64_t, int64_t, const Skip&, int, Isa);
PS_CONV_PLAN_INSTANTIATE(float)
PS_CONV_PLAN_INSTANTIATE(double)
#undef PS_CONV_PLAN_INSTANTIATE

}  // namespace conv
}  // namespace ps
