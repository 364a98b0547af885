// The plan of one kernel map for the fused kernels (fused.h, sparse.h): the
// map's pairs checked once and laid out as the kernels read them. Per offset
// (the identity of a submanifold map left out) the int32 pairs sorted by
// output row (forward, weight gradient) and sorted by input row (input
// gradient), and the block cuts of both directions (PairList::cuts), built in
// one pass over the map's int64 pairs. The plan of the transposed map is the
// same arrays with the two directions exchanged: no pass over the pairs.
//
// Flat buffers only. Nothing here takes the GIL or raises: building reports
// what it found wrong in a PlanStatus, and the binding (bind.cpp) checks every
// argument of a call (shapes, dtypes, row counts against num_in / num_out)
// before it calls in; the kernels trust these arrays.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "conv/fused.h"

namespace ps {
namespace conv {

// What building a plan found wrong; a later check runs only when the earlier
// ones passed, so at most the first problem is reported.
struct PlanStatus {
  int64_t bad_in = -1;         // first pair whose input row is outside [0, num_in)
  int64_t bad_out = -1;        // first pair whose output row is outside [0, num_out)
  bool not_identity = false;   // the identity offset's pairs are not (i, i), i < num_in == num_out
  int64_t repeated_offset = -1;  // first offset (in offset order) pairing one row twice
  int64_t repeated_row = -1;     // that row
  bool repeated_by_input = false;  // the row is an input row (else an output row)
  bool ok() const { return bad_in < 0 && bad_out < 0 && !not_identity && repeated_offset < 0; }
};

class Plan {
 public:
  // in, out: P pairs grouped by offset, ptr: kernel_volume + 1 prefix sums
  // (ptr[0] == 0, non-decreasing, ptr[K] == P); 0 <= num_in, num_out < 2^31;
  // identity -1 or the offset whose pairs are (i, i). The binding checks these
  // shapes and ranges; the pairs themselves are checked here (status). The
  // plan is usable only when status.ok().
  Plan(const int64_t* in, const int64_t* out, const int64_t* ptr, int64_t kernel_volume, int64_t num_in,
       int64_t num_out, int64_t identity, int nt, PlanStatus& status);

  // The plan of the transposed (adjoint) map, inputs and outputs swapped,
  // sharing this plan's pairs.
  Plan transposed() const;

  int64_t num_in() const { return num_in_; }
  int64_t num_out() const { return num_out_; }
  int64_t kernel_volume() const { return int64_t(ptr_.size()) - 1; }
  int64_t identity() const { return identity_; }
  // Pairs of the map, the identity's included.
  int64_t num_pairs() const { return ptr_.back() + (identity_ >= 0 ? num_in_ : 0); }
  // Rows written in one direction (by_input: the input gradient's).
  int64_t rows(bool by_input) const { return by_input ? num_in_ : num_out_; }
  // The pairs of one direction: by output row (forward, weight gradient) or
  // by input row (input gradient).
  PairList pairs(bool by_input) const;
  // First pair of offset k in the int32 arrays (K + 1 entries).
  const int64_t* ptr() const { return ptr_.data(); }

 private:
  struct Scan;
  Scan scan_offset(const int64_t* in, const int64_t* out, const int64_t* pp, int64_t k);
  void sort_pairs(const int64_t* in, const int64_t* out, const int64_t* pp, const std::vector<Scan>& scan, int nt,
                  PlanStatus& status);
  void block_cuts(const int32_t* row, int64_t k, int64_t num_rows, std::vector<int64_t>& cuts) const;

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

// The pairs of one call that leaves offsets out: the cuts of an offset whose
// active flag is 0 made constant (no pairs in any block; O(blocks * K), no
// pair touched) and its identity dropped. active: K flags, or null (all run).
// The map and the plan stay whole.
class Skip {
 public:
  Skip(const Plan& plan, bool by_input, const uint8_t* active);
  Skip(const Skip&) = delete;  // pairs_.cuts may point into cuts_
  Skip& operator=(const Skip&) = delete;
  const PairList& pairs() const { return pairs_; }

 private:
  PairList pairs_;
  std::vector<int64_t> cuts_;
};

// Whether run_apply marks its output to stream (ApplyArgs::stream, kStreamAutoBytes
// in fused.h): the forward (not transpose) of the dense kernels (not
// vector) on a submanifold map whose identity offset `skip` leaves out,
// running no more pairs than the map has output rows (one a row on average).
// fused.cpp streams it only in the avx512 build's float32 kernels.
bool streams_output(const Plan& plan, const Skip& skip, bool transpose, bool vector);

// dst = bias + sum over the offsets of `skip` of dst[row] += src[col] @ W_k
// (W[k], or W[k]^T when transpose: the input gradient); every row of dst
// (plan.rows(transpose) rows, cols columns) is written. vector: the
// vector-sparse kernels; add (dst's shape, or null): a residual added to
// dst before the ReLU (ApplyArgs::add). Runs without the GIL.
template <typename T>
void run_apply(const Plan& plan, const T* src, const T* w, const T* bias, T* dst, int64_t kc, int64_t cols,
               bool transpose, const Skip& skip, int nt, Isa isa, bool relu, bool vector, const T* add = nullptr);

// grad_w[k] = x[in]^T @ g[out] over the pairs of offset k, summed over fixed
// units of row blocks (a function of the map and the channels only) and the
// units' partials added in unit order; every entry written (zero for a
// skipped offset). mask (K, c_in, c_out) or null: only the vectors where it
// holds a nonzero are computed, the rest zero. Runs without the GIL.
template <typename T>
void run_wgrad(const Plan& plan, const T* x, const T* g, T* grad_w, const T* mask, int64_t c_in, int64_t c_out,
               const Skip& skip, int nt, Isa isa);

// The bf16 forward (ApplyBf16Args) over the plan's pairs by output row;
// dst_bf16 (or null): dst rounded to bf16 as well; vector_density: see
// Bf16Execution (fused.h); add (or null): a bf16 residual (ApplyBf16Args);
// tiles_width: where the AMX form runs (ApplyBf16Args). Returns what ran.
// Precondition: bf16_runs(). Runs without the GIL.
Bf16Execution run_apply_bf16(const Plan& plan, const uint16_t* src, const uint16_t* w, const float* bias,
                             float* dst, int64_t kc, int64_t cols, int nt, bool relu, uint16_t* dst_bf16 = nullptr,
                             double vector_density = -1.0, const uint16_t* add = nullptr,
                             double tiles_width = __builtin_inf());

}  // namespace conv
}  // namespace ps
