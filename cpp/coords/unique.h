// Grouping equal keys: the sort behind unique_keys and voxelisation.
#pragma once

#include <cstdint>
#include <vector>

namespace ps {

// Stable radix sort of n non-negative keys, then runs of equal keys:
// sorted[i] the keys ascending, perm[i] the row of sorted[i] (perm holds n),
// starts the first position of each run plus n at the end (M + 1 entries for
// M distinct keys), inverse[row] the run of each row (inverse holds n). Rows
// of a run keep their original order. num_threads is the caller's request:
// the sort and the scatter each take what their size warrants (common.h).
// Touches no Python object.
void group_keys(const int64_t* keys, int64_t n, std::vector<int64_t>& sorted, int64_t* perm,
                std::vector<int64_t>& starts, int64_t* inverse, int num_threads);

}  // namespace ps
