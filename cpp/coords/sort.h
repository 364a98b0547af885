// Parallel, stable LSD radix sort of non-negative int64 keys, carrying the
// original row index. Used for voxelisation, downsampling ("ranking") and
// the merge-sort kernel map. Deterministic for any thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace ps {

// On return keys[i] is sorted ascending and perm[i] is the original row of
// keys[i]; ties keep their original order. Only the bits below the highest
// set bit of max(keys) are sorted.
void radix_sort_keys(std::vector<int64_t>& keys, std::vector<int64_t>& perm, int num_threads);

// The same for keys that are already in a caller buffer (n rows); perm_out
// receives the permutation, keys_out the sorted keys (keys_out may be keys:
// a row is read before it is written).
void radix_sort_keys(const int64_t* keys, int64_t n, int64_t* keys_out, int64_t* perm_out,
                     int num_threads);

// keys_out = keys sorted ascending (n rows), no permutation kept.
void radix_sort_keys_only(const int64_t* keys, int64_t n, int64_t* keys_out, int num_threads);

}  // namespace ps
