#include "coords/sort.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "common.h"
#include "scratch.h"

namespace ps {
namespace {
constexpr int kDigitBits = 11;
constexpr int kBuckets = 1 << kDigitBits;
// Below this many keys the sort runs on one thread: two threads save at most
// a millisecond there (Zen 4, 2 cores: 120k keys 2.2 ms on 1 thread, 1.6 ms
// on 2), while on a busy machine every barrier of a 2-thread sort can wait a
// time slice for a descheduled thread (the same 120k keys: 5-140 ms).
constexpr int64_t kSortParallelMin = int64_t(1) << 18;

// counts[u][b] (u = thread, b = bucket) -> the first output row of thread u's
// keys in bucket b: buckets in order, threads in order within a bucket.
void exclusive_scan(int64_t* counts, int team) {
  int64_t sum = 0;
  for (int b = 0; b < kBuckets; ++b)
    for (int u = 0; u < team; ++u) {
      int64_t& v = counts[size_t(u) * kBuckets + b];
      const int64_t cnt = v;
      v = sum;
      sum += cnt;
    }
}
}  // namespace

// Two parallel regions: a read pass that finds the largest key and whether
// the keys are sorted already (and copies keys alone to keys_out), then one
// for the rest (with rows: the copy or packing below; per digit: count,
// scan, scatter), so a call synchronises 2 + 3 * passes times instead of
// forking a team per step. Each thread owns the same row range in
// every pass. The result is the unique stable order: identical for any
// thread count.
// kPerm false: the keys alone (perm_out unused), half the bytes moved a pass.
// kPerm true and the key's bits and a row's bits fit one word together: the
// row rides in the word's low bits ((key << row_bits) | row, sorted on the
// key's digits only, split again at the end), so a pass moves one word a row
// instead of a key and a row: the same stable order, half the bytes.
namespace {
template <bool kPerm>
void radix_sort_impl(const int64_t* keys, int64_t n, int64_t* keys_out, int64_t* perm_out, int num_threads) {
  if (n <= 0) return;
  const int nt = n < kSortParallelMin ? 1 : threads(num_threads);
  std::vector<int64_t> counts(size_t(nt) * kBuckets), maxima(nt, 0);
  std::vector<uint8_t> ordered(nt, 1);
  // The largest key and whether the keys are in order already, in a region
  // of its own: the buffers below are sized by it, and an allocation that
  // throws inside a parallel region would terminate the process.
#pragma omp parallel num_threads(nt)
  {
    const int team = omp_get_num_threads();
    const int t = omp_get_thread_num();
    const int64_t lo = n * t / team, hi = n * (t + 1) / team;
    int64_t top = 0;
    bool up = true;
    for (int64_t i = lo; i < hi; ++i) {
      top = std::max(top, keys[i]);
      up = up && (i == 0 || keys[i - 1] <= keys[i]);
      if (!kPerm) keys_out[i] = keys[i];  // the keys alone: copied in this pass (keys_out != keys)
    }
    maxima[t] = top;
    ordered[t] = up;
  }
  // Keys already in order (a re-sort of sorted keys, common for the coords of
  // a cache) need no pass: the copy below is the whole sort.
  const bool all = std::all_of(ordered.begin(), ordered.end(), [](uint8_t v) { return v != 0; });
  const int key_bits = bits_for(uint64_t(*std::max_element(maxima.begin(), maxima.end())) + 1);
  const int passes = all ? 0 : (key_bits + kDigitBits - 1) / kDigitBits;
  const int row_bits = bits_for(uint64_t(n));
  const bool packed = kPerm && passes > 0 && key_bits + row_bits <= kKeyBits;
  const int low = packed ? row_bits : 0;  // digits start at bit `low`
  const bool rows = kPerm && !packed;      // rows moved beside the keys
  Scratch<int64_t> k_tmp(kScratchSortKeys, passes > 0 ? n : 0), p_tmp(kScratchSortRows, rows && passes > 0 ? n : 0);
#pragma omp parallel num_threads(nt)
  {
    const int team = omp_get_num_threads();
    const int t = omp_get_thread_num();
    const int64_t lo = n * t / team, hi = n * (t + 1) / team;
    if (kPerm) {
      for (int64_t i = lo; i < hi; ++i) {
        if (packed) {
          keys_out[i] = (keys[i] << low) | i;
        } else {
          keys_out[i] = keys[i];
          perm_out[i] = i;
        }
      }
#pragma omp barrier
    }
    int64_t *k_src = keys_out, *p_src = perm_out, *k_dst = k_tmp.get(), *p_dst = p_tmp.get();
    int64_t* c = counts.data() + size_t(t) * kBuckets;
    for (int pass = 0; pass < passes; ++pass) {
      const int shift = low + pass * kDigitBits;
      std::fill(c, c + kBuckets, 0);
      for (int64_t i = lo; i < hi; ++i) ++c[(k_src[i] >> shift) & (kBuckets - 1)];
#pragma omp barrier
#pragma omp single
      exclusive_scan(counts.data(), team);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t pos = c[(k_src[i] >> shift) & (kBuckets - 1)]++;
        k_dst[pos] = k_src[i];
        if (rows) p_dst[pos] = p_src[i];
      }
      std::swap(k_src, k_dst);
      std::swap(p_src, p_dst);
#pragma omp barrier
    }
    if (packed) {  // split the words (from wherever the last pass wrote them)
      const int64_t mask = (int64_t(1) << low) - 1;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t w = k_src[i];
        perm_out[i] = w & mask;
        keys_out[i] = w >> low;
      }
    }
  }
  if (!packed && passes % 2 == 1) {  // the last pass wrote the scratch buffers
    std::memcpy(keys_out, k_tmp.get(), sizeof(int64_t) * n);
    if (kPerm) std::memcpy(perm_out, p_tmp.get(), sizeof(int64_t) * n);
  }
}
}  // namespace

void radix_sort_keys(const int64_t* keys, int64_t n, int64_t* keys_out, int64_t* perm_out, int num_threads) {
  radix_sort_impl<true>(keys, n, keys_out, perm_out, num_threads);
}

void radix_sort_keys_only(const int64_t* keys, int64_t n, int64_t* keys_out, int num_threads) {
  radix_sort_impl<false>(keys, n, keys_out, nullptr, num_threads);
}

void radix_sort_keys(std::vector<int64_t>& keys, std::vector<int64_t>& perm, int num_threads) {
  const int64_t n = int64_t(keys.size());
  std::vector<int64_t> sorted(n);
  perm.resize(n);
  radix_sort_keys(keys.data(), n, sorted.data(), perm.data(), num_threads);
  keys.swap(sorted);
}

}  // namespace ps
