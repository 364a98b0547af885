// Shared by both finders: the mirror plan, range helpers, the downsampling
// ("ranking") of output coords, and the assembly of the flat pair arrays.
#include <omp.h>

#include <algorithm>
#include <array>
#include <limits>
#include <memory>

#include "common.h"
#include "coords/sort.h"
#include "kmap/kmap.h"

namespace ps {
namespace kmap {

namespace {

// Rows from which parent_pairs splits its passes after the sort over the
// threads.
constexpr int64_t kParentsParallelMin = int64_t(1) << 15;

// Whether every stride is a power of two (all the networks' strides): then
// a parent floor(c / s) * s is c with its low bits cleared (c & -s, negative
// c included), where a division per axis and row took most of a
// downsampling.
bool pow2_strides(const int64_t* stride) {
  bool pow2 = true;
  for (int a = 0; a < 3; ++a) pow2 = pow2 && (stride[a] & (stride[a] - 1)) == 0;
  return pow2;
}

}  // namespace

std::vector<int64_t> mirror_sources(const int32_t* offsets, int64_t k, bool submanifold) {
  std::vector<int64_t> mirror(k, -1);
  if (!submanifold) return mirror;
  // Offsets sorted lexicographically (ties by index): each -o is one binary
  // search away, so the plan costs O(K log K) for any kernel.
  auto at = [offsets](int64_t o) {
    const int32_t* a = offsets + 3 * o;
    return std::array<int64_t, 4>{a[0], a[1], a[2], o};
  };
  std::vector<std::array<int64_t, 4>> sorted(k);
  for (int64_t o = 0; o < k; ++o) sorted[o] = at(o);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t o = 0; o < k; ++o) {
    const int32_t* a = offsets + 3 * o;
    // o is derived from -o when -o is in the kernel and -o > o lexicographically.
    const bool negative = a[0] < 0 || (a[0] == 0 && (a[1] < 0 || (a[1] == 0 && a[2] < 0)));
    if (!negative) continue;
    const std::array<int64_t, 4> want{-int64_t(a[0]), -int64_t(a[1]), -int64_t(a[2]), -1};
    auto it = std::lower_bound(sorted.begin(), sorted.end(), want);  // the first index holding -o
    if (it != sorted.end() && (*it)[0] == want[0] && (*it)[1] == want[1] && (*it)[2] == want[2])
      mirror[o] = (*it)[3];
  }
  return mirror;
}

void count_kept(const int64_t* out_idx, const int64_t* ptr, int64_t k, const int64_t* out_new, int64_t* kept,
                int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t o = 0; o < k; ++o) {
    int64_t n = 0;
    for (int64_t p = ptr[o]; p < ptr[o + 1]; ++p) n += out_new[out_idx[p]] >= 0;
    kept[o] = n;
  }
}

void write_kept(const int64_t* in_idx, const int64_t* out_idx, const int64_t* ptr, int64_t k,
                const int64_t* out_new, const int64_t* at, int64_t* in_kept, int64_t* out_kept, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t o = 0; o < k; ++o) {
    int64_t w = at[o];
    for (int64_t p = ptr[o]; p < ptr[o + 1]; ++p) {
      const int64_t q = out_new[out_idx[p]];
      if (q >= 0) {
        in_kept[w] = in_idx[p];
        out_kept[w] = q;
        ++w;
      }
    }
  }
}

void coords_bbox(const int32_t* c, int64_t n, int64_t* lo, int64_t* hi, int nt) {
  int64_t lx = std::numeric_limits<int64_t>::max(), ly = lx, lz = lx;
  int64_t hx = std::numeric_limits<int64_t>::min(), hy = hx, hz = hx;
#pragma omp parallel for num_threads(nt) schedule(static) \
    reduction(min : lx, ly, lz) reduction(max : hx, hy, hz)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    lx = std::min<int64_t>(lx, r[1]);
    ly = std::min<int64_t>(ly, r[2]);
    lz = std::min<int64_t>(lz, r[3]);
    hx = std::max<int64_t>(hx, r[1]);
    hy = std::max<int64_t>(hy, r[2]);
    hz = std::max<int64_t>(hz, r[3]);
  }
  lo[0] = lx, lo[1] = ly, lo[2] = lz;
  hi[0] = hx, hi[1] = hy, hi[2] = hz;
}

bool shift_safe(const KeyLayout& layout, const int64_t* lo, const int64_t* hi, int64_t dx, int64_t dy,
                int64_t dz) {
  const int64_t d[3] = {dx, dy, dz};
  for (int a = 0; a < 3; ++a)
    if (!layout.axis_contains(a, lo[a] + d[a]) || !layout.axis_contains(a, hi[a] + d[a])) return false;
  return true;
}

bool row_shift_ok(const KeyLayout& layout, const int32_t* r, int64_t dx, int64_t dy, int64_t dz) {
  return layout.axis_contains(0, int64_t(r[1]) + dx) && layout.axis_contains(1, int64_t(r[2]) + dy) &&
         layout.axis_contains(2, int64_t(r[3]) + dz);
}

std::vector<int64_t> pair_counts(const Found& found, int64_t k) {
  std::vector<int64_t> counts(k, 0);
  for (int64_t o = 0; o < k; ++o) {
    const int64_t src = found.mirror_of[o] < 0 ? o : found.mirror_of[o];
    for (int64_t c = 0; c < found.num_chunks; ++c)
      counts[o] += int64_t(found.buffers[src * found.num_chunks + c].in.size());
  }
  return counts;
}

namespace {

// One unit of assembly: copy chunk `chunk` of offset `o` to `dest`, or
// (chunk < 0) sort all pairs of offset o by out row through a scatter.
struct Task {
  int64_t o, chunk, dest;
};

}  // namespace

void assemble(const Found& found, int64_t k, int64_t num_out, const std::vector<int64_t>& ptr,
              int64_t* in_idx, int64_t* out_idx, int nt) {
  const int64_t nc = found.num_chunks;
  // An offset is in canonical order when its out rows ascend over its chunks:
  // computed offsets when the finder says so, mirrored ones when their
  // source's in rows ascend.
  std::vector<char> ordered(k, 1);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t o = 0; o < k; ++o) {
    const int64_t src = found.mirror_of[o];
    if (src < 0) {
      ordered[o] = found.sorted_by_out;
      continue;
    }
    int64_t last = -1;
    bool ok = true;
    for (int64_t c = 0; c < nc && ok; ++c) {
      const auto& v = found.buffers[src * nc + c].in;
      for (int32_t x : v) {
        if (x <= last) {
          ok = false;
          break;
        }
        last = x;
      }
    }
    ordered[o] = ok;
  }
  std::vector<Task> tasks;
  for (int64_t o = 0; o < k; ++o) {
    if (!ordered[o]) {
      tasks.push_back({o, -1, ptr[o]});
      continue;
    }
    const int64_t src = found.mirror_of[o] < 0 ? o : found.mirror_of[o];
    int64_t dest = ptr[o];
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t size = int64_t(found.buffers[src * nc + c].in.size());
      if (size) tasks.push_back({o, c, dest});
      dest += size;
    }
  }
  const int64_t num_tasks = int64_t(tasks.size());
#pragma omp parallel num_threads(nt)
  {
    std::vector<int64_t> slot;  // scatter space of a canonicalising task
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task task = tasks[t];
      const bool swap = found.mirror_of[task.o] >= 0;
      const int64_t src = swap ? found.mirror_of[task.o] : task.o;
      if (task.chunk >= 0) {
        const PairBuffer& b = found.buffers[src * nc + task.chunk];
        const int32_t* ins = swap ? b.out.data() : b.in.data();
        const int32_t* outs = swap ? b.in.data() : b.out.data();
        const int64_t size = int64_t(b.in.size());
        for (int64_t i = 0; i < size; ++i) {
          in_idx[task.dest + i] = ins[i];
          out_idx[task.dest + i] = outs[i];
        }
        continue;
      }
      // Each out row has at most one pair per offset: scatter, then compact.
      if (slot.empty()) slot.assign(num_out, -1);
      for (int64_t c = 0; c < nc; ++c) {
        const PairBuffer& b = found.buffers[src * nc + c];
        const int32_t* ins = swap ? b.out.data() : b.in.data();
        const int32_t* outs = swap ? b.in.data() : b.out.data();
        for (size_t i = 0; i < b.in.size(); ++i) slot[outs[i]] = ins[i];
      }
      int64_t pos = task.dest;
      for (int64_t r = 0; r < num_out; ++r) {
        if (slot[r] < 0) continue;
        in_idx[pos] = slot[r];
        out_idx[pos] = r;
        ++pos;
        slot[r] = -1;
      }
    }
  }
}

void downsample_keys(const int32_t* c, int64_t n, const int64_t* stride, const KeyLayout& layout,
                     std::vector<int64_t>& out_keys, int nt) {
  std::unique_ptr<int64_t[]> keys(new int64_t[size_t(n > 0 ? n : 1)]);  // every row written below
  // Strides of powers of two (all the networks' strides): floor(c / s) * s is
  // c with its low bits cleared (c & -s, negative c included), where a
  // division per axis and row took most of the call: KITTI sweep, 91k rows,
  // stride 2, one thread, AMD EPYC Zen 3 [avx2], 4.90 -> 3.19 ms
  // (bench/kmap_instructions.py --time, case "downsample s2").
  if (pow2_strides(stride)) {
    const int64_t m0 = -stride[0], m1 = -stride[1], m2 = -stride[2];
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* r = c + 4 * i;
      keys[i] = layout.pack(r[0], r[1] & m0, r[2] & m1, r[3] & m2);
    }
  } else {
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* r = c + 4 * i;
      int64_t q[3];
      for (int a = 0; a < 3; ++a) q[a] = floor_div(r[a + 1], stride[a]) * stride[a];
      keys[i] = layout.pack(r[0], q[0], q[1], q[2]);
    }
  }
  std::unique_ptr<int64_t[]> sorted(new int64_t[size_t(n > 0 ? n : 1)]);
  radix_sort_keys_only(keys.get(), n, sorted.get(), nt);
  int64_t m = 0;  // the distinct keys, in place
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || sorted[i] != sorted[m - 1]) sorted[m++] = sorted[i];
  out_keys.assign(sorted.get(), sorted.get() + m);
}

ParentPairs parent_pairs(const int32_t* c, int64_t n, const int64_t* stride, const int64_t* kernel,
                         const KeyLayout& layout, int64_t* in_idx, int64_t* out_idx, int nt) {
  ParentPairs out;
  const int64_t volume = kernel[0] * kernel[1] * kernel[2];
  out.sizes.assign(size_t(volume), 0);
  if (n == 0) return out;
  // Offset index of a row: i_x * k_y * k_z + i_y * k_z + i_z (z fastest, as
  // kernel_offsets), i_a = (c_a - parent_a) / step_a in [0, k_a), k_a <= 2:
  // whether c_a - parent_a reaches step_a (step = the tensor stride).
  const int64_t step[3] = {stride[0] / kernel[0], stride[1] / kernel[1], stride[2] / kernel[2]};
  const int64_t weight[3] = {kernel[1] * kernel[2], kernel[2], 1};
  const bool pow2 = pow2_strides(stride);
  std::unique_ptr<int64_t[]> keys(new int64_t[size_t(n)]), perm(new int64_t[size_t(n)]);
  std::unique_ptr<uint8_t[]> offset(new uint8_t[size_t(n)]);  // volume <= 8
  int64_t off_grid = std::numeric_limits<int64_t>::max();     // first row not on the tensor stride's grid
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout) reduction(min : off_grid)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    int64_t q[3], k = 0;
    bool grid = true;
    for (int a = 0; a < 3; ++a) {
      q[a] = pow2 ? int64_t(r[a + 1]) & -stride[a] : floor_div(r[a + 1], stride[a]) * stride[a];
      const int64_t d = r[a + 1] - q[a];
      grid = grid && (pow2 ? (d & (step[a] - 1)) == 0 : d % step[a] == 0);
      k += int64_t(d >= step[a]) * weight[a];
    }
    if (!grid) off_grid = std::min(off_grid, i);
    keys[i] = layout.pack(r[0], q[0], q[1], q[2]);
    offset[i] = uint8_t(k);
  }
  if (off_grid != std::numeric_limits<int64_t>::max()) {
    out.off_grid_row = off_grid;
    return out;
  }
  radix_sort_keys(keys.get(), n, keys.get(), perm.get(), nt);  // in place: the sort reads a row before writing it
  // The sorted rows in chunks that start where a parent starts (a parent's
  // rows never split), one per thread where there are enough rows: each
  // chunk counts its parents and its pairs per offset, then writes them at
  // its own place in every offset's run, in sorted order: out rows ascending
  // within each offset, the arrays those of one pass over all rows, for any
  // thread count. Serial, these passes made the call 1.45x slower than the
  // merge-sort builder on a generated street of 1M voxels (2 threads,
  // bench/kmap.py); split, 1.48x faster (bench/results/kmap_zen3_stop29.md).
  // One thread: 2% more instructions than the serial single pass on the
  // KITTI sweep (bench/kmap_instructions.py, case "k2 s2 cached").
  const int64_t chunks = n < kParentsParallelMin ? 1 : nt;
  std::vector<int64_t> bound(size_t(chunks + 1), n);
  bound[0] = 0;
  for (int64_t t = 1; t < chunks; ++t) {
    int64_t b = std::max(bound[t - 1], n * t / chunks);
    while (b > 0 && b < n && keys[b] == keys[b - 1]) ++b;
    bound[t] = b;
  }
  // Per chunk: its parents, its pairs per offset, its first repeated (parent, offset).
  std::vector<int64_t> groups(size_t(chunks), 0), counts(size_t(chunks * volume), 0), repeat(size_t(chunks), -1);
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (chunks > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    int64_t* cnt = counts.data() + t * volume;
    int64_t g = 0;
    unsigned seen = 0;
    for (int64_t i = bound[t]; i < bound[t + 1]; ++i) {
      if (i == bound[t] || keys[i] != keys[i - 1]) {
        ++g;
        seen = 0;
      }
      const unsigned bit = 1u << offset[perm[i]];
      if ((seen & bit) && repeat[t] < 0) repeat[t] = i;
      seen |= bit;
      ++cnt[offset[perm[i]]];
    }
    groups[t] = g;
  }
  for (int64_t t = 0; t < chunks; ++t) {  // the first in sorted order, as one pass finds it
    if (repeat[t] >= 0) {
      out.duplicate_row = perm[repeat[t]];
      return out;
    }
  }
  // Where each chunk writes: its first out row, and per offset its first pair.
  std::vector<int64_t> first_group(size_t(chunks), 0), cursor(size_t(chunks * volume), 0);
  for (int64_t t = 1; t < chunks; ++t) first_group[t] = first_group[t - 1] + groups[t - 1];
  int64_t pos = 0;
  for (int64_t k = 0; k < volume; ++k) {
    for (int64_t t = 0; t < chunks; ++t) {
      cursor[t * volume + k] = pos;
      pos += counts[t * volume + k];
      out.sizes[k] += counts[t * volume + k];
    }
  }
  out.out_keys.resize(size_t(first_group[chunks - 1] + groups[chunks - 1]));
  int64_t* out_keys = out.out_keys.data();
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (chunks > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    int64_t* cur = cursor.data() + t * volume;
    int64_t m = first_group[t] - 1;
    for (int64_t i = bound[t]; i < bound[t + 1]; ++i) {
      if (i == bound[t] || keys[i] != keys[i - 1]) out_keys[++m] = keys[i];
      const int64_t p = perm[i];
      const int64_t at = cur[offset[p]]++;
      in_idx[at] = p;
      out_idx[at] = m;
    }
  }
  return out;
}

}  // namespace kmap
}  // namespace ps
