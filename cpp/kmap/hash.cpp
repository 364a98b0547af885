// Kernel map by hashing: an open-addressing table (linear probing, load
// <= 1/2) over the exact 64-bit keys of the input rows; the hash only picks
// the first bucket, keys are always compared exactly. Parallel build with a
// compare-and-swap on the key, parallel queries over chunks of output rows.
#include <omp.h>

#include <algorithm>
#include <memory>

#include "common.h"
#include "kmap/kmap.h"

namespace ps {
namespace kmap {
namespace {

constexpr int64_t kEmpty = -1;     // keys are >= 0
constexpr int64_t kChunk = 4096;   // output rows per work item (fixed: results never depend on threads)

struct Slot {
  int64_t key;
  int64_t row;
};

// murmur3's 64-bit finaliser: every key bit reaches the bucket bits.
inline uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb93fe53ec1a9ULL;
  x ^= x >> 33;
  return x;
}

class Table {
 public:
  Table(int64_t n, int nt) {
    while (capacity_ < 2 * n) capacity_ <<= 1;
    mask_ = capacity_ - 1;
    slots_.reset(new Slot[capacity_]);
    Slot* s = slots_.get();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < capacity_; ++i) s[i] = {kEmpty, -1};
  }

  // Thread-safe insert of a new key; false when the key is already there.
  bool insert(int64_t key, int64_t row) {
    uint64_t h = mix(uint64_t(key)) & uint64_t(mask_);
    for (;;) {
      Slot& s = slots_[h];
      int64_t expected = kEmpty;
      if (__atomic_compare_exchange_n(&s.key, &expected, key, false, __ATOMIC_ACQ_REL,
                                      __ATOMIC_ACQUIRE)) {
        s.row = row;  // read only after the parallel build ends
        return true;
      }
      if (expected == key) return false;
      h = (h + 1) & uint64_t(mask_);
    }
  }

  int64_t find(int64_t key) const {
    uint64_t h = mix(uint64_t(key)) & uint64_t(mask_);
    for (;;) {
      const Slot& s = slots_[h];
      if (s.key == key) return s.row;
      if (s.key == kEmpty) return -1;
      h = (h + 1) & uint64_t(mask_);
    }
  }

 private:
  int64_t capacity_ = 16;
  int64_t mask_ = 15;
  std::unique_ptr<Slot[]> slots_;
};

void pack_rows(const int32_t* c, int64_t n, const KeyLayout& layout, int64_t* keys, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    keys[i] = layout.pack(r[0], r[1], r[2], r[3]);
  }
}

}  // namespace

Found find_hash(const int32_t* in_c, int64_t n, const int32_t* out_c, int64_t m,
                const int32_t* offsets, int64_t k, const KeyLayout& layout, int nt) {
  const bool submanifold = out_c == nullptr;
  if (submanifold) out_c = in_c, m = n;
  Found found;
  found.mirror_of = mirror_sources(offsets, k, submanifold);
  found.num_chunks = (m + kChunk - 1) / kChunk;
  found.buffers.resize(size_t(k * found.num_chunks));
  found.sorted_by_out = true;  // each chunk walks its out rows in order
  if (n == 0 || m == 0) return found;

  std::vector<int64_t> in_keys(n);
  pack_rows(in_c, n, layout, in_keys.data(), nt);
  Table table(n, nt);
  int64_t duplicate = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : duplicate)
  for (int64_t i = 0; i < n; ++i) duplicate += !table.insert(in_keys[i], i);
  if (duplicate) {
    found.duplicate_row = 0;
    return found;
  }
  std::vector<int64_t> out_keys_store;
  const int64_t* out_keys = in_keys.data();
  if (!submanifold) {
    out_keys_store.resize(m);
    pack_rows(out_c, m, layout, out_keys_store.data(), nt);
    out_keys = out_keys_store.data();
  }
  int64_t lo[3], hi[3];
  coords_bbox(out_c, m, lo, hi, nt);
  std::vector<char> safe(k);
  std::vector<int64_t> delta(k);
  for (int64_t o = 0; o < k; ++o) {
    const int32_t* d = offsets + 3 * o;
    safe[o] = shift_safe(layout, lo, hi, d[0], d[1], d[2]);
    delta[o] = layout.delta(d[0], d[1], d[2]);
  }
  const int64_t nc = found.num_chunks;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r0 = c * kChunk, r1 = std::min(m, r0 + kChunk);
    for (int64_t o = 0; o < k; ++o) {
      if (found.mirror_of[o] >= 0) continue;
      PairBuffer& buf = found.buffers[o * nc + c];
      const int32_t* d = offsets + 3 * o;
      for (int64_t r = r0; r < r1; ++r) {
        if (!safe[o] && !row_shift_ok(layout, out_c + 4 * r, d[0], d[1], d[2])) continue;
        const int64_t row = table.find(out_keys[r] + delta[o]);
        if (row >= 0) {
          buf.in.push_back(int32_t(row));
          buf.out.push_back(int32_t(r));
        }
      }
    }
  }
  return found;
}

}  // namespace kmap
}  // namespace ps
