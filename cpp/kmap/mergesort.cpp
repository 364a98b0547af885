// Kernel map by merging sorted keys (PointAcc's merge-sort mapping on a CPU).
//
// Input and output keys are sorted once (radix sort; skipped when already
// sorted, as voxelised and downsampled coords are). Shifting every output
// key by an offset keeps them sorted, so one linear merge with the sorted
// input keys finds all pairs of that offset. Offsets sharing (dx, dy) differ
// only in z, whose field is the lowest: their matches are consecutive input
// keys in the window [key + delta(dx, dy, zlo), key + delta(dx, dy, zhi)],
// so one merge per (dx, dy) column serves the whole column.
//
// A shift that moves a coordinate out of range would carry into the next
// field and break the order: rows whose window leaves the range take a
// binary search per offset with exact range checks instead (rare: only rows
// at the border of the coordinate range), the merge pointer moves only for
// rows whose window is exact.
#include <omp.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "coords/sort.h"
#include "kmap/kmap.h"

namespace ps {
namespace kmap {
namespace {

constexpr int64_t kChunk = 8192;  // output rows per work item (fixed: results never depend on threads)

// One (dx, dy) column: the computed offsets of the kernel with this (dx, dy),
// dz ascending.
struct Column {
  int64_t dx, dy;
  std::vector<int64_t> dz, offset;
};

// Sorted keys of coords and the permutation (identity when already sorted).
struct SortedKeys {
  std::vector<int64_t> keys, perm;
  bool identity = true;
};

SortedKeys sorted_keys(const int32_t* c, int64_t n, int nt) {
  SortedKeys s;
  std::vector<int64_t> keys(n);
  int64_t unsorted = 0;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    keys[i] = pack_key(r[0], r[1], r[2], r[3]);
  }
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : unsorted)
  for (int64_t i = 1; i < n; ++i) unsorted += keys[i] < keys[i - 1];
  if (!unsorted) {
    s.keys.swap(keys);
    return s;
  }
  s.identity = false;
  s.keys.resize(n);
  s.perm.resize(n);
  radix_sort_keys(keys.data(), n, s.keys.data(), s.perm.data(), nt);
  return s;
}

std::vector<Column> columns(const int32_t* offsets, int64_t k, const std::vector<int64_t>& mirror) {
  std::vector<Column> cols;
  for (int64_t o = 0; o < k; ++o) {
    if (mirror[o] >= 0) continue;
    const int32_t* d = offsets + 3 * o;
    // Join the previous column when (dx, dy) match and dz ascends.
    bool joined = false;
    if (!cols.empty()) {
      Column& c = cols.back();
      if (c.dx == d[0] && c.dy == d[1] && d[2] > c.dz.back()) {
        c.dz.push_back(d[2]);
        c.offset.push_back(o);
        joined = true;
      }
    }
    if (!joined) cols.push_back({d[0], d[1], {d[2]}, {o}});
  }
  return cols;
}

// Whether the key's coordinates shifted by (dx, dy, dz) stay in range, from
// the biased fields of the key.
inline bool key_shift_ok(int64_t key, int64_t dx, int64_t dy, int64_t dz) {
  const int64_t x = ((key >> kShiftX) & kCoordMask) + dx;
  const int64_t y = ((key >> kShiftY) & kCoordMask) + dy;
  const int64_t z = (key & kCoordMask) + dz;
  return x >= 0 && x <= kCoordMask && y >= 0 && y <= kCoordMask && z >= 0 && z <= kCoordMask;
}

struct Merge {
  const int64_t* in;  // sorted input keys
  int64_t n;
  const SortedKeys* in_sorted;
  const SortedKeys* out_sorted;
  Found* found;

  void emit(int64_t o, int64_t c, int64_t jj, int64_t i) const {
    PairBuffer& b = found->buffers[o * found->num_chunks + c];
    b.in.push_back(int32_t(in_sorted->identity ? jj : in_sorted->perm[jj]));
    b.out.push_back(int32_t(out_sorted->identity ? i : out_sorted->perm[i]));
  }

  // Rows whose window leaves the coordinate range: one exact lookup per offset.
  void lookup(const Column& col, int64_t c, int64_t i, int64_t key) const {
    for (size_t e = 0; e < col.dz.size(); ++e) {
      if (!key_shift_ok(key, col.dx, col.dy, col.dz[e])) continue;
      const int64_t q = key + key_delta(col.dx, col.dy, col.dz[e]);
      const int64_t* p = std::lower_bound(in, in + n, q);
      if (p != in + n && *p == q) emit(col.offset[e], c, p - in, i);
    }
  }

  // Output rows [r0, r1) (sorted positions) of chunk c against one column.
  void run(const Column& col, bool column_safe, int64_t c, int64_t r0, int64_t r1) const {
    const int64_t* out = out_sorted->keys.data();
    const int64_t base = key_delta(col.dx, col.dy, 0);
    const int64_t zlo = col.dz.front(), zhi = col.dz.back();
    const int64_t* dz = col.dz.data();
    const int64_t* off = col.offset.data();
    auto exact = [&](int64_t key) {
      return column_safe || (key_shift_ok(key, col.dx, col.dy, zlo) && key_shift_ok(key, col.dx, col.dy, zhi));
    };
    int64_t i = r0;
    for (; i < r1 && !exact(out[i]); ++i) lookup(col, c, i, out[i]);
    if (i == r1) return;
    int64_t j = std::lower_bound(in, in + n, out[i] + base + zlo) - in;
    for (; i < r1; ++i) {
      const int64_t key = out[i];
      if (!exact(key)) {
        lookup(col, c, i, key);
        continue;
      }
      const int64_t lo = key + base + zlo, hi = key + base + zhi;
      while (j < n && in[j] < lo) ++j;
      int64_t e = 0;
      for (int64_t jj = j; jj < n && in[jj] <= hi; ++jj) {
        const int64_t d = in[jj] - key - base;
        while (dz[e] < d) ++e;  // d <= zhi = dz[last]
        if (dz[e] == d) emit(off[e], c, jj, i);
      }
    }
  }
};

}  // namespace

Found find_mergesort(const int32_t* in_c, int64_t n, const int32_t* out_c, int64_t m,
                     const int32_t* offsets, int64_t k, int nt) {
  const bool submanifold = out_c == nullptr;
  if (submanifold) m = n;
  Found found;
  found.mirror_of = mirror_sources(offsets, k, submanifold);
  found.num_chunks = (m + kChunk - 1) / kChunk;
  found.buffers.resize(size_t(k * found.num_chunks));
  if (n == 0 || m == 0) return found;

  const SortedKeys in_sorted = sorted_keys(in_c, n, nt);
  const int64_t* in = in_sorted.keys.data();
  int64_t duplicate = std::numeric_limits<int64_t>::max();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : duplicate)
  for (int64_t i = 1; i < n; ++i)
    if (in[i] == in[i - 1]) duplicate = std::min(duplicate, i);
  if (duplicate != std::numeric_limits<int64_t>::max()) {
    found.duplicate_row = in_sorted.identity ? duplicate : in_sorted.perm[duplicate];
    return found;
  }
  SortedKeys out_store;
  if (!submanifold) out_store = sorted_keys(out_c, m, nt);
  const SortedKeys& out_sorted = submanifold ? in_sorted : out_store;
  found.sorted_by_out = out_sorted.identity;

  int64_t lo[3], hi[3];
  coords_bbox(submanifold ? in_c : out_c, m, lo, hi, nt);
  const std::vector<Column> cols = columns(offsets, k, found.mirror_of);
  const int64_t ncol = int64_t(cols.size());
  std::vector<char> safe(ncol);
  for (int64_t g = 0; g < ncol; ++g)
    safe[g] = shift_safe(lo, hi, cols[g].dx, cols[g].dy, cols[g].dz.front()) &&
              shift_safe(lo, hi, cols[g].dx, cols[g].dy, cols[g].dz.back());

  const Merge merge{in, n, &in_sorted, &out_sorted, &found};
  const int64_t nc = found.num_chunks;
  const int64_t items = ncol * nc;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t t = 0; t < items; ++t) {
    const int64_t g = t / nc, c = t % nc;
    const int64_t r0 = c * kChunk, r1 = std::min(m, r0 + kChunk);
    merge.run(cols[g], safe[g], c, r0, r1);
  }
  return found;
}

}  // namespace kmap
}  // namespace ps
