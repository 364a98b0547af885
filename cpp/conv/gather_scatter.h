// Row gather and deterministic scatter-add for the gather-GEMM-scatter
// convolution. Flat buffers only; the caller checks every bound first.
//
// A "segment" g is a range [start[g], start[g] + len[g]) of a flat index
// array `idx` (int64). Segment g owns the rows [g * rows, g * rows + rows) of
// a padded buffer `buf` of `channels` columns (len[g] <= rows).
#pragma once

#include <cstdint>

namespace ps {

// buf[g * rows + i] = src[idx[start[g] + i]] for i < len[g]; zero rows up to
// `rows` (the padding a batched matmul reads).
template <typename T>
void gather_segments(const T* src, int64_t channels, const int64_t* idx, const int64_t* start,
                     const int64_t* len, int64_t num_segments, int64_t rows, T* buf, int nt);

// dst[idx[start[g] + i]] += buf[g * rows + i] for i < len[g], segment after
// segment. Within one segment `idx` must not repeat (true for the pairs of one
// kernel offset), so each segment's loop is race-free; segments are added in
// their order, so the result is the same for any thread count.
template <typename T>
void scatter_add_segments(const T* buf, int64_t channels, const int64_t* idx, const int64_t* start,
                          const int64_t* len, int64_t num_segments, int64_t rows, T* dst, int nt);

}  // namespace ps
