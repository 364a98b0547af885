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
// A shift that moves a coordinate out of its key field would carry into the
// next field and break the order: rows whose window leaves the fields take a
// binary search per offset with exact checks instead (only when the layout
// had no room for a margin as wide as the kernel: spans near the key's 63
// bits), the merge pointer moves only for rows whose window is exact. A
// window must also end below the sentinel (only a 63-bit layout reaches it).
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
constexpr int64_t kMaxWindow = 4096;  // widest z window one merge scans (else split the column)
constexpr int kFixedWindow = 8;       // windows up to this width: branch-free scan
constexpr int64_t kPad = kFixedWindow;  // sentinel keys after the sorted keys
constexpr int64_t kSentinel = std::numeric_limits<int64_t>::max();

// One (dx, dy) column: the computed offsets of the kernel with this (dx, dy),
// dz ascending; slot[z - dz.front()] is the entry of dz == z, or -1.
struct Column {
  int64_t dx, dy;
  std::vector<int64_t> dz, offset;
  std::vector<int32_t> slot;
};

// Sorted keys of coords (followed by kPad sentinels) and the permutation
// (identity when already sorted).
struct SortedKeys {
  std::vector<int64_t> keys, perm;
  bool identity = true;
};

SortedKeys sorted_keys(const int32_t* c, int64_t n, const KeyLayout& layout, int nt) {
  SortedKeys s;
  std::vector<int64_t> keys(n + kPad, kSentinel);
  int64_t unsorted = 0;
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    keys[i] = layout.pack(r[0], r[1], r[2], r[3]);
  }
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : unsorted)
  for (int64_t i = 1; i < n; ++i) unsorted += keys[i] < keys[i - 1];
  if (!unsorted) {
    s.keys.swap(keys);
    return s;
  }
  s.identity = false;
  s.keys.assign(n + kPad, kSentinel);
  s.perm.resize(n);
  radix_sort_keys(keys.data(), n, s.keys.data(), s.perm.data(), nt);
  return s;
}

std::vector<Column> columns(const int32_t* offsets, int64_t k, const std::vector<int64_t>& mirror) {
  std::vector<Column> cols;
  for (int64_t o = 0; o < k; ++o) {
    if (mirror[o] >= 0) continue;
    const int32_t* d = offsets + 3 * o;
    // Join the previous column when (dx, dy) match, dz ascends and the window stays narrow.
    if (!cols.empty()) {
      Column& c = cols.back();
      if (c.dx == d[0] && c.dy == d[1] && d[2] > c.dz.back() && d[2] - c.dz.front() < kMaxWindow) {
        c.dz.push_back(d[2]);
        c.offset.push_back(o);
        continue;
      }
    }
    cols.push_back({d[0], d[1], {d[2]}, {o}, {}});
  }
  for (Column& c : cols) {
    c.slot.assign(size_t(c.dz.back() - c.dz.front() + 1), -1);
    for (size_t e = 0; e < c.dz.size(); ++e) c.slot[size_t(c.dz[e] - c.dz.front())] = int32_t(e);
  }
  return cols;
}

// Matches of one work item, per column entry e: sorted positions
// (in_pos[e * kChunk + t], out_pos[e * kChunk + t]) for t < count[e]. Entry
// `entries` is a dump for the branch-free scan (never counted).
struct Scratch {
  std::vector<int32_t> in_pos, out_pos;
  std::vector<int64_t> count;

  void reset(size_t entries) {
    if (in_pos.size() < (entries + 1) * kChunk) {
      in_pos.resize((entries + 1) * kChunk);
      out_pos.resize((entries + 1) * kChunk);
    }
    count.assign(entries + 1, 0);
  }
  void add(int64_t e, int64_t j, int64_t i) {
    const int64_t t = e * kChunk + count[e]++;
    in_pos[t] = int32_t(j);
    out_pos[t] = int32_t(i);
  }
};

struct Merge {
  const KeyLayout* layout;
  const int64_t* in;  // sorted input keys, kPad sentinels after them
  int64_t n;
  const SortedKeys* in_sorted;
  const SortedKeys* out_sorted;
  Found* found;

  // Rows whose window leaves the coordinate range: one exact lookup per offset.
  void lookup(const Column& col, int64_t i, int64_t key, Scratch& s) const {
    for (size_t e = 0; e < col.dz.size(); ++e) {
      if (!layout->key_shift_ok(key, col.dx, col.dy, col.dz[e])) continue;
      const int64_t q = key + layout->delta(col.dx, col.dy, col.dz[e]);
      const int64_t* p = std::lower_bound(in, in + n, q);
      if (p != in + n && *p == q) s.add(int64_t(e), p - in, i);
    }
  }

  // Output rows [r0, r1) (sorted positions) of chunk c against one column;
  // W: the window width when at most kFixedWindow (0: any width).
  template <int W>
  void scan(const Column& col, bool column_safe, int64_t r0, int64_t r1, Scratch& s) const {
    const int64_t* __restrict in_keys = in;
    const int64_t* __restrict out = out_sorted->keys.data();
    const int64_t base = layout->delta(col.dx, col.dy, 0);
    const int64_t zlo = col.dz.front(), zhi = col.dz.back();
    const int64_t entries = int64_t(col.dz.size());
    // slot of a window position; the dump entry for non-matching positions.
    int32_t slot[kFixedWindow + 1];
    if (W > 0) {
      for (int t = 0; t <= W; ++t) slot[t] = t < W && col.slot[t] >= 0 ? col.slot[t] : int32_t(entries);
    }
    const int32_t* wide_slot = col.slot.data();
    int32_t* __restrict in_pos = s.in_pos.data();
    int32_t* __restrict out_pos = s.out_pos.data();
    int64_t* __restrict count = s.count.data();
    // Modulo 2^64, as delta(): exact for the rows whose window is exact.
    const int64_t shift_lo = int64_t(uint64_t(base) + uint64_t(zlo));
    const int64_t shift_hi = int64_t(uint64_t(base) + uint64_t(zhi));
    auto exact = [&](int64_t key) {
      return column_safe || (layout->key_shift_ok(key, col.dx, col.dy, zlo) &&
                             layout->key_shift_ok(key, col.dx, col.dy, zhi) && key + shift_hi < kSentinel);
    };
    int64_t i = r0;
    for (; i < r1 && !exact(out[i]); ++i) lookup(col, i, out[i], s);
    if (i == r1) return;
    int64_t j = std::lower_bound(in_keys, in_keys + n, out[i] + shift_lo) - in_keys;
    for (; i < r1; ++i) {
      const int64_t key = out[i];
      if (!exact(key)) {
        lookup(col, i, key, s);
        continue;
      }
      const int64_t lo = key + shift_lo;
      while (in_keys[j] < lo) ++j;  // the sentinels stop it at n
      if (W > 0) {
        // Keys are unique: the window's keys are among in[j .. j + W).
        for (int t = 0; t < W; ++t) {
          const uint64_t d = uint64_t(in_keys[j + t] - lo);
          const int32_t e = slot[d < uint64_t(W) ? d : uint64_t(W)];
          const int64_t pos = e * kChunk + count[e];
          in_pos[pos] = int32_t(j + t);
          out_pos[pos] = int32_t(i);
          count[e] += e != entries;
        }
      } else {
        const int64_t hi = key + shift_hi;
        for (int64_t jj = j; in_keys[jj] <= hi; ++jj) {
          const int32_t e = wide_slot[in_keys[jj] - lo];
          if (e < 0) continue;
          const int64_t pos = e * kChunk + count[e]++;
          in_pos[pos] = int32_t(jj);
          out_pos[pos] = int32_t(i);
        }
      }
    }
  }

  void run(const Column& col, bool column_safe, int64_t c, int64_t r0, int64_t r1, Scratch& s) const {
    s.reset(col.dz.size());
    switch (col.slot.size()) {
      case 1: scan<1>(col, column_safe, r0, r1, s); break;
      case 2: scan<2>(col, column_safe, r0, r1, s); break;
      case 3: scan<3>(col, column_safe, r0, r1, s); break;
      case 4: scan<4>(col, column_safe, r0, r1, s); break;
      case 5: scan<5>(col, column_safe, r0, r1, s); break;
      case 6: scan<6>(col, column_safe, r0, r1, s); break;
      case 7: scan<7>(col, column_safe, r0, r1, s); break;
      case 8: scan<8>(col, column_safe, r0, r1, s); break;
      default: scan<0>(col, column_safe, r0, r1, s); break;
    }
    // Sorted positions -> original rows, into this (offset, chunk)'s buffer.
    const int64_t* in_perm = in_sorted->identity ? nullptr : in_sorted->perm.data();
    const int64_t* out_perm = out_sorted->identity ? nullptr : out_sorted->perm.data();
    for (size_t e = 0; e < col.dz.size(); ++e) {
      PairBuffer& b = found->buffers[col.offset[e] * found->num_chunks + c];
      const int64_t size = s.count[e];
      b.in.resize(size);
      b.out.resize(size);
      const int32_t* pi = s.in_pos.data() + e * kChunk;
      const int32_t* po = s.out_pos.data() + e * kChunk;
      for (int64_t t = 0; t < size; ++t) {
        b.in[t] = in_perm ? int32_t(in_perm[pi[t]]) : pi[t];
        b.out[t] = out_perm ? int32_t(out_perm[po[t]]) : po[t];
      }
    }
  }
};

}  // namespace

Found find_mergesort(const int32_t* in_c, int64_t n, const int32_t* out_c, int64_t m,
                     const int32_t* offsets, int64_t k, const KeyLayout& layout, int nt) {
  const bool submanifold = out_c == nullptr;
  if (submanifold) m = n;
  Found found;
  found.mirror_of = mirror_sources(offsets, k, submanifold);
  found.num_chunks = (m + kChunk - 1) / kChunk;
  found.buffers.resize(size_t(k * found.num_chunks));
  if (n == 0 || m == 0) return found;

  const SortedKeys in_sorted = sorted_keys(in_c, n, layout, nt);
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
  if (!submanifold) out_store = sorted_keys(out_c, m, layout, nt);
  const SortedKeys& out_sorted = submanifold ? in_sorted : out_store;
  found.sorted_by_out = out_sorted.identity;

  int64_t lo[3], hi[3];
  coords_bbox(submanifold ? in_c : out_c, m, lo, hi, nt);
  const std::vector<Column> cols = columns(offsets, k, found.mirror_of);
  const int64_t ncol = int64_t(cols.size());
  std::vector<char> safe(ncol);
  // A 63-bit layout's largest key equals the sentinel: check its rows one by one.
  const bool below_sentinel = layout.total_bits() < kKeyBits;
  for (int64_t g = 0; g < ncol; ++g)
    safe[g] = below_sentinel && shift_safe(layout, lo, hi, cols[g].dx, cols[g].dy, cols[g].dz.front()) &&
              shift_safe(layout, lo, hi, cols[g].dx, cols[g].dy, cols[g].dz.back());

  const Merge merge{&layout, in, n, &in_sorted, &out_sorted, &found};
  const int64_t nc = found.num_chunks;
  const int64_t items = ncol * nc;
#pragma omp parallel num_threads(nt)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    // Chunk-major: the columns of one chunk run back to back, so the chunk's
    // output keys and the input keys near them are still in cache.
    for (int64_t t = 0; t < items; ++t) {
      const int64_t c = t / ncol, g = t % ncol;
      const int64_t r0 = c * kChunk, r1 = std::min(m, r0 + kChunk);
      merge.run(cols[g], safe[g], c, r0, r1, scratch);
    }
  }
  return found;
}

}  // namespace kmap
}  // namespace ps
