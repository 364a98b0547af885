// Kernel maps: for every kernel offset o, the pairs (in_row, out_row) with
// in_coords[in_row] == out_coords[out_row] + o (same batch).
//
// Two finders fill per-(offset, chunk) pair buffers, then assemble() writes
// the flat result: offsets in input order, within an offset sorted by
// out_row ascending (the canonical order every method returns).
//   find_hash:      open-addressing table over exact 64-bit keys.
//   find_mergesort: sorted keys; for each (dx, dy) column of offsets one
//                   linear merge of the shifted output keys with the input keys.
// Submanifold maps (outputs == inputs, same rows) compute only the offsets o
// with o >= -o lexicographically (or whose mirror is not in the kernel) and
// derive -o by swapping the pairs of o.
//
// Shapes: coords (N, 4) / (M, 4) int32 [batch, x, y, z], all inside the
// KeyLayout passed in (common.h; the binding fits it to both sets, with a
// margin for the offsets when that fits); offsets (K, 3) int32, K at most
// kMaxKernelVolume. Row counts below 2^31. Every function here runs without
// the GIL and throws nothing: errors come back as status.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace ps {
namespace kmap {

// Most offsets one map takes (32^3): bounds the per-offset work and memory.
constexpr int64_t kMaxKernelVolume = int64_t(1) << 15;

// Pairs of one offset within one chunk of output rows (original row numbers).
struct PairBuffer {
  std::vector<int32_t> in, out;
};

struct Found {
  int64_t num_chunks = 0;
  // buffers[o * num_chunks + c]; empty for mirrored offsets.
  std::vector<PairBuffer> buffers;
  // mirror_of[o] = index of -o when o's pairs are the swapped pairs of -o, else -1.
  std::vector<int64_t> mirror_of;
  // Whether each computed offset's buffers, in chunk order, are sorted by out row.
  bool sorted_by_out = true;
  // First input row found to duplicate another (-1: none).
  int64_t duplicate_row = -1;
};

// Which offsets a map computes directly (see above).
std::vector<int64_t> mirror_sources(const int32_t* offsets, int64_t k, bool submanifold);

// out == nullptr: submanifold (outputs are the inputs).
Found find_hash(const int32_t* in_coords, int64_t n, const int32_t* out_coords, int64_t m,
                const int32_t* offsets, int64_t k, const KeyLayout& layout, int nt);
Found find_mergesort(const int32_t* in_coords, int64_t n, const int32_t* out_coords, int64_t m,
                     const int32_t* offsets, int64_t k, const KeyLayout& layout, int nt);

// Pairs per offset (mirrored offsets count their source's pairs).
std::vector<int64_t> pair_counts(const Found& found, int64_t k);

// Flat in_idx / out_idx (ptr: prefix sums of pair_counts, K + 1 entries).
void assemble(const Found& found, int64_t k, int64_t num_out, const std::vector<int64_t>& ptr,
              int64_t* in_idx, int64_t* out_idx, int nt);

// Output coords of a downsampling: unique floor(c / s) * s per batch, sorted
// by key, as keys of `layout` (which holds every downsampled row).
void downsample_keys(const int32_t* coords, int64_t n, const int64_t* stride, const KeyLayout& layout,
                     std::vector<int64_t>& out_keys, int nt);

// The map of a conv whose kernel tiles its stride (per axis the kernel is
// 1 or 2 offsets, stride[a] = kernel[a] * tensor_stride[a], dilation 1):
// every input row pairs with its parent floor(c / stride) * stride through
// the offset c - parent. Parent keys of `layout` (which holds every
// downsampled row) sorted with their rows (one sort, the downsampling's), so
// the out rows are the distinct parents in key order and the pairs come out
// grouped by offset, by out row within an offset, without a search.
// out_keys: the distinct parents; in_idx, out_idx: n each; sizes: kernel
// volume. Reports (and fills nothing past) the first input row off the grid
// of stride / kernel, or else the first row that shares its parent and
// offset with an earlier one (a duplicate coordinate); -1 when none.
struct ParentPairs {
  std::vector<int64_t> out_keys, sizes;
  int64_t off_grid_row = -1, duplicate_row = -1;
};
ParentPairs parent_pairs(const int32_t* coords, int64_t n, const int64_t* stride, const int64_t* kernel,
                         const KeyLayout& layout, int64_t* in_idx, int64_t* out_idx, int nt);

// A map's pairs restricted to the output rows that out_new keeps
// (out_new[q] >= 0: row q's new number, -1: dropped), in their order:
// count_kept gives kept[o], the pairs of offset o (pairs ptr[o]..ptr[o+1])
// left; write_kept writes them, out rows renumbered, from at[o] on (the
// prefix sums of kept). The caller has checked every out_idx against
// out_new's length.
void count_kept(const int64_t* out_idx, const int64_t* ptr, int64_t k, const int64_t* out_new, int64_t* kept,
                int nt);
void write_kept(const int64_t* in_idx, const int64_t* out_idx, const int64_t* ptr, int64_t k,
                const int64_t* out_new, const int64_t* at, int64_t* in_kept, int64_t* out_kept, int nt);

// Bounding box of coords' x, y, z: lo[3], hi[3] (n > 0).
void coords_bbox(const int32_t* coords, int64_t n, int64_t* lo, int64_t* hi, int nt);

// Whether every row of the box shifted by (dx, dy, dz) stays in the layout's fields.
bool shift_safe(const KeyLayout& layout, const int64_t* lo, const int64_t* hi, int64_t dx, int64_t dy,
                int64_t dz);

// Whether the row's coordinates shifted by (dx, dy, dz) stay in the layout's fields.
bool row_shift_ok(const KeyLayout& layout, const int32_t* row, int64_t dx, int64_t dy, int64_t dz);

}  // namespace kmap
}  // namespace ps
