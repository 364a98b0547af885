// Voxelisation kernels: quantise points to exact keys, group them into
// voxels, reduce per-voxel features, and find the trilinear neighbours of
// points among active voxels. Flat buffers only; every size and index is
// checked by bind.cpp before these run (they touch no Python object, so they
// run with the GIL released; the ones that can meet a bad point throw
// ValueError through value_error).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "coords/layout.h"

namespace ps {
namespace voxelize {

// Reduce modes of segment_reduce and voxelize.
enum Mode : int { kSum = 0, kMean = 1, kMax = 2, kFirst = 3 };

// Pass 1 of quantisation: the first unrepresentable row (non-finite, outside
// int32, or a batch outside [0, kBatchMax]), -1 when none, and the bounds of
// the voxels [batch, floor(p / vs)], written to q (n, 3) as int32 (a bad
// row's left unset). p: (n, 3); batch: (n) or
// null; vs: 3.
template <typename F>
int64_t quantize_bounds(const F* p, const int64_t* batch, int64_t n, const double* vs, Bounds& out, int32_t* q,
                        int nt);

// ValueError naming the row `bad` found by quantize_bounds (no-op for -1).
void check_quantized(int64_t bad, const int64_t* batch);

// Pass 2: the key of each point's voxel q (pass 1's) in `layout` (fitted to
// the bounds).
void quantize_keys(const int32_t* q, const int64_t* batch, int64_t n, const KeyLayout& layout, int64_t* keys,
                   int nt);

// The voxels of n points: quantise (both passes, ValueError on a bad row),
// then group equal keys (coords/unique.h). perm and inverse hold n each.
struct Voxels {
  KeyLayout layout;
  std::vector<int64_t> sorted;  // every point's key, ascending
  std::vector<int64_t> starts;  // first sorted position of each voxel, then n
  int64_t count() const { return int64_t(starts.size()) - 1; }
};
template <typename F>
Voxels group_points(const F* p, const int64_t* batch, int64_t n, const double* vs, int64_t* perm,
                    int64_t* inverse, int num_threads);

// coords (M, 4) int32 [batch, x, y, z] and seg_ptr (M + 1) of the voxels.
void voxel_coords(const Voxels& voxels, int32_t* coords, int64_t* seg_ptr, int nt);

// Rows perm[seg[j]:seg[j + 1]] of x (n, c) reduced into out row j (m rows).
// arg: the source row of each max (m, c) (the first NaN row where a voxel
// holds NaN: max propagates NaN) or of each first (m); unused otherwise,
// and may be null where no gradient needs it (then not written).
template <typename F>
void reduce(const F* x, int64_t c, const int64_t* perm, const int64_t* seg, int64_t m, int mode, F* out,
            int64_t* arg, int nt);

// For each of n points, the rows of the 8 voxels around it (-1 where
// inactive) and trilinear weights normalised over the active ones. Voxel
// coordinates are multiples of st (3); keys/rows: the m voxel keys in
// `layout`, ascending, and the row of each.
template <typename F>
void trilinear(const F* p, const int64_t* batch, int64_t n, const double* vs, const int64_t* st,
               const KeyLayout& layout, const int64_t* keys, const int64_t* rows, int64_t m, int64_t* idx, F* w,
               int nt);

}  // namespace voxelize
}  // namespace ps
