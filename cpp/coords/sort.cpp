#include "coords/sort.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "common.h"

namespace ps {
namespace {
constexpr int kDigitBits = 11;
constexpr int kBuckets = 1 << kDigitBits;
}  // namespace

void radix_sort_keys(const int64_t* keys, int64_t n, int64_t* keys_out, int64_t* perm_out,
                     int num_threads) {
  if (n <= 0) return;
  const int nt = threads(num_threads, n);  // small inputs: one thread is faster
  int64_t max_key = 0;
#pragma omp parallel for num_threads(nt) reduction(max : max_key) schedule(static)
  for (int64_t i = 0; i < n; ++i) max_key = std::max(max_key, keys[i]);
  int bits = 0;
  while (bits < 63 && (max_key >> bits) != 0) ++bits;
  const int passes = (bits + kDigitBits - 1) / kDigitBits;

  std::vector<int64_t> k_tmp(n), p_tmp(n);
  int64_t* k_src = keys_out;
  int64_t* p_src = perm_out;
  int64_t* k_dst = k_tmp.data();
  int64_t* p_dst = p_tmp.data();
  std::memcpy(k_src, keys, sizeof(int64_t) * n);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) p_src[i] = i;
  if (passes == 0) return;

  // counts[t][b]: how many keys of thread t's chunk fall in bucket b. The
  // chunks follow the team OpenMP really starts, which can be smaller than
  // nt (OMP_THREAD_LIMIT, OMP_DYNAMIC, a nested region): every row must
  // belong to a running thread.
  std::vector<int64_t> counts(size_t(nt) * kBuckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * kDigitBits;
    std::fill(counts.begin(), counts.end(), 0);
#pragma omp parallel num_threads(nt)
    {
      const int team = omp_get_num_threads();
      const int t = omp_get_thread_num();
      const int64_t lo = n * t / team, hi = n * (t + 1) / team;
      int64_t* c = counts.data() + size_t(t) * kBuckets;
      for (int64_t i = lo; i < hi; ++i) ++c[(k_src[i] >> shift) & (kBuckets - 1)];
#pragma omp barrier
#pragma omp single
      {
        int64_t sum = 0;
        for (int b = 0; b < kBuckets; ++b)
          for (int u = 0; u < team; ++u) {
            int64_t& v = counts[size_t(u) * kBuckets + b];
            const int64_t cnt = v;
            v = sum;
            sum += cnt;
          }
      }
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t pos = c[(k_src[i] >> shift) & (kBuckets - 1)]++;
        k_dst[pos] = k_src[i];
        p_dst[pos] = p_src[i];
      }
    }
    std::swap(k_src, k_dst);
    std::swap(p_src, p_dst);
  }
  if (k_src != keys_out) {
    std::memcpy(keys_out, k_src, sizeof(int64_t) * n);
    std::memcpy(perm_out, p_src, sizeof(int64_t) * n);
  }
}

void radix_sort_keys(std::vector<int64_t>& keys, std::vector<int64_t>& perm, int num_threads) {
  const int64_t n = int64_t(keys.size());
  std::vector<int64_t> sorted(n);
  perm.resize(n);
  radix_sort_keys(keys.data(), n, sorted.data(), perm.data(), num_threads);
  keys.swap(sorted);
}

}  // namespace ps
