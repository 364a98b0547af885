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

// Matches of one work item in regions of 2 * kChunk positions: region r
// holds its sorted input positions at in(r)[t] and output positions at
// out(r)[t], t < count[r]. A narrow column (a window of at most
// kFixedWindow) uses one region per window slot (dz - dz.front(), whether
// an offset of the map has that dz or not: a slot without one is written
// and never read); a wide column one region per entry.
struct Scratch {
  std::vector<int32_t> pos;
  std::vector<int64_t> count;

  void reset(size_t regions) {
    if (pos.size() < regions * 2 * kChunk) pos.resize(regions * 2 * kChunk);
    count.assign(regions, 0);
  }
  int32_t* in(int64_t r) { return pos.data() + r * 2 * kChunk; }
  int32_t* out(int64_t r) { return in(r) + kChunk; }
  void add(int64_t r, int64_t j, int64_t i) {
    const int64_t t = count[r]++;
    in(r)[t] = int32_t(j);
    out(r)[t] = int32_t(i);
  }
};

struct Merge {
  const KeyLayout* layout;
  const int64_t* in;  // sorted input keys, kPad sentinels after them
  int64_t n;
  const SortedKeys* in_sorted;
  const SortedKeys* out_sorted;
  Found* found;

  // Rows whose window leaves the coordinate range: one exact lookup per
  // offset (entry e into region e, or its slot's when `by_slot`).
  void lookup(const Column& col, bool by_slot, int64_t i, int64_t key, Scratch& s) const {
    for (size_t e = 0; e < col.dz.size(); ++e) {
      if (!layout->key_shift_ok(key, col.dx, col.dy, col.dz[e])) continue;
      const int64_t q = key + layout->delta(col.dx, col.dy, col.dz[e]);
      const int64_t* p = std::lower_bound(in, in + n, q);
      if (p != in + n && *p == q) s.add(by_slot ? col.dz[e] - col.dz.front() : int64_t(e), p - in, i);
    }
  }

  // Output rows [r0, r1) (sorted positions) of chunk c against one column;
  // W: the window width when at most kFixedWindow (0: any width); kSafe:
  // every row's window stays inside the key fields (shift_safe), so no
  // row is checked.
  template <int W, bool kSafe>
  void scan(const Column& col, int64_t r0, int64_t r1, Scratch& s) const {
    const int64_t* __restrict in_keys = in;
    const int64_t* __restrict out = out_sorted->keys.data();
    const int64_t base = layout->delta(col.dx, col.dy, 0);
    const int64_t zlo = col.dz.front(), zhi = col.dz.back();
    const int32_t* wide_slot = col.slot.data();
    // Modulo 2^64, as delta(): exact for the rows whose window is exact.
    const int64_t shift_lo = int64_t(uint64_t(base) + uint64_t(zlo));
    const int64_t shift_hi = int64_t(uint64_t(base) + uint64_t(zhi));
    auto exact = [&](int64_t key) {
      return kSafe || (layout->key_shift_ok(key, col.dx, col.dy, zlo) &&
                       layout->key_shift_ok(key, col.dx, col.dy, zhi) && key + shift_hi < kSentinel);
    };
    int64_t i = r0;
    for (; i < r1 && !exact(out[i]); ++i) lookup(col, W > 0, i, out[i], s);
    if (i == r1) return;
    int64_t j = std::lower_bound(in_keys, in_keys + n, out[i] + shift_lo) - in_keys;
    // W > 0: slot w's next write, a pointer in a register for the whole
    // scan (the input position at p[w][0], the output one at p[w][kChunk]),
    // advanced by one where the slot matched, instead of a count in memory
    // indexed by the entry found. With the kSafe scan and the four-key skip
    // below: KITTI 000049 subm k3, one thread, 53.51 -> 51.68 M
    // instructions a build against 16ad684 (bench/kmap_instructions.py,
    // AMD EPYC Zen 3 [avx2]).
    int32_t* p[kFixedWindow];
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) p[w] = s.in(w) + s.count[w];
    auto flush = [&] {
#pragma GCC unroll 8
      for (int w = 0; w < W; ++w) s.count[w] = p[w] - s.in(w);
    };
    for (; i < r1; ++i) {
      const int64_t key = out[i];
      if (!kSafe && !exact(key)) {
        if (W > 0) flush();
        lookup(col, W > 0, i, key, s);
#pragma GCC unroll 8
        for (int w = 0; w < W; ++w) p[w] = s.in(w) + s.count[w];
        continue;
      }
      const int64_t lo = key + shift_lo;
      // Up to four keys skipped at once, their loads independent (the next
      // output row's window starts about one input key further on): one
      // load's latency per row instead of a chain of dependent ones; the
      // loop only for longer gaps. The keys are sorted, so the keys below
      // lo come first; the sentinels stop it at n (kPad keys after it).
      for (;;) {
        const int64_t skip = int64_t(in_keys[j] < lo) + int64_t(in_keys[j + 1] < lo) +
                             int64_t(in_keys[j + 2] < lo) + int64_t(in_keys[j + 3] < lo);
        j += skip;
        if (skip < 4) break;
      }
      if (W > 0) {
        // Keys are unique and sorted: the key of slot w (lo + w), if
        // present, is in[j + t] for one t <= w.
        uint64_t d[kFixedWindow];
#pragma GCC unroll 8
        for (int t = 0; t < W; ++t) d[t] = uint64_t(in_keys[j + t]) - uint64_t(lo);
#pragma GCC unroll 8
        for (int w = 0; w < W; ++w) {
          int64_t at = 0;
          bool hit_any = false;
#pragma GCC unroll 8
          for (int t = 0; t <= w; ++t) {
            const bool hit = d[t] == uint64_t(w);
            hit_any |= hit;
            at |= hit ? t : 0;
          }
          p[w][0] = int32_t(j + at);
          p[w][kChunk] = int32_t(i);
          p[w] += hit_any;
        }
      } else {
        const int64_t hi = key + shift_hi;
        for (int64_t jj = j; in_keys[jj] <= hi; ++jj) {
          const int32_t e = wide_slot[in_keys[jj] - lo];
          if (e >= 0) s.add(e, jj, i);
        }
      }
    }
    if (W > 0) flush();
  }

  template <int W>
  void scan_column(const Column& col, bool column_safe, int64_t r0, int64_t r1, Scratch& s) const {
    if (column_safe)
      scan<W, true>(col, r0, r1, s);
    else
      scan<W, false>(col, r0, r1, s);
  }

  void run(const Column& col, bool column_safe, int64_t c, int64_t r0, int64_t r1, Scratch& s) const {
    const int64_t width = int64_t(col.slot.size());
    const bool by_slot = width <= kFixedWindow;
    s.reset(size_t(by_slot ? width : int64_t(col.dz.size())));
    switch (by_slot ? width : 0) {
      case 1: scan_column<1>(col, column_safe, r0, r1, s); break;
      case 2: scan_column<2>(col, column_safe, r0, r1, s); break;
      case 3: scan_column<3>(col, column_safe, r0, r1, s); break;
      case 4: scan_column<4>(col, column_safe, r0, r1, s); break;
      case 5: scan_column<5>(col, column_safe, r0, r1, s); break;
      case 6: scan_column<6>(col, column_safe, r0, r1, s); break;
      case 7: scan_column<7>(col, column_safe, r0, r1, s); break;
      case 8: scan_column<8>(col, column_safe, r0, r1, s); break;
      default: scan_column<0>(col, column_safe, r0, r1, s); break;
    }
    // Sorted positions -> original rows, into this (offset, chunk)'s buffer.
    const int64_t* in_perm = in_sorted->identity ? nullptr : in_sorted->perm.data();
    const int64_t* out_perm = out_sorted->identity ? nullptr : out_sorted->perm.data();
    for (size_t e = 0; e < col.dz.size(); ++e) {
      const int64_t r = by_slot ? col.dz[e] - col.dz.front() : int64_t(e);
      PairBuffer& b = found->buffers[col.offset[e] * found->num_chunks + c];
      const int64_t size = s.count[r];
      b.in.resize(size);
      b.out.resize(size);
      const int32_t* pi = s.in(r);
      const int32_t* po = s.out(r);
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
