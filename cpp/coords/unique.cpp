// Grouping equal keys (unique.h).
#include "coords/unique.h"

#include <omp.h>

#include <cstddef>

#include "common.h"
#include "coords/sort.h"

namespace ps {

void group_keys(const int64_t* keys, int64_t n, std::vector<int64_t>& sorted, int64_t* perm,
                std::vector<int64_t>& starts, int64_t* inverse, int num_threads) {
  sorted.resize(std::size_t(n));
  radix_sort_keys(keys, n, sorted.data(), perm, threads(num_threads));  // the sort picks its own grain
  const int nt = stream_threads(num_threads, n);
  starts.clear();
  starts.reserve(std::size_t(n) + 1);
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || sorted[i] != sorted[i - 1]) starts.push_back(i);
  starts.push_back(n);
  const int64_t m = int64_t(starts.size()) - 1;
  const int64_t* s = starts.data();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = s[j]; i < s[j + 1]; ++i) inverse[perm[i]] = j;
}

}  // namespace ps
