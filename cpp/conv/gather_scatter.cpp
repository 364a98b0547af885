// Gather / scatter-add kernels (see gather_scatter.h).
#include "conv/gather_scatter.h"

#include <omp.h>

#include <cstring>

namespace ps {
namespace {

// Rows per thread chunk: enough work to amortise scheduling, small enough to
// balance the last segment of a group.
constexpr int64_t kGrain = 256;

template <typename T>
inline void add_row(T* __restrict dst, const T* __restrict src, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) dst[j] += src[j];
}

}  // namespace

template <typename T>
void gather_segments(const T* src, int64_t channels, const int64_t* idx, const int64_t* start,
                     const int64_t* len, int64_t num_segments, int64_t rows, T* buf, int nt) {
  const int64_t total = num_segments * rows;
  const size_t row_bytes = size_t(channels) * sizeof(T);
#pragma omp parallel for num_threads(nt) schedule(static, kGrain) if (total * channels > 16384)
  for (int64_t r = 0; r < total; ++r) {
    const int64_t g = r / rows, i = r - g * rows;
    T* out = buf + r * channels;
    if (i < len[g])
      std::memcpy(out, src + idx[start[g] + i] * channels, row_bytes);
    else
      std::memset(out, 0, row_bytes);
  }
}

template <typename T>
void scatter_add_segments(const T* buf, int64_t channels, const int64_t* idx, const int64_t* start,
                          const int64_t* len, int64_t num_segments, int64_t rows, T* dst, int nt) {
  // One parallel region; the barrier at the end of each `omp for` orders the
  // segments, so a row's additions happen in segment order on any thread count.
#pragma omp parallel num_threads(nt) if (num_segments * rows * channels > 16384)
  for (int64_t g = 0; g < num_segments; ++g) {
    const int64_t* seg = idx + start[g];
    const T* in = buf + g * rows * channels;
    const int64_t n = len[g];
#pragma omp for schedule(static, kGrain)
    for (int64_t i = 0; i < n; ++i) add_row(dst + seg[i] * channels, in + i * channels, channels);
  }
}

#define PS_INSTANTIATE(T)                                                                        \
  template void gather_segments<T>(const T*, int64_t, const int64_t*, const int64_t*,          \
                                   const int64_t*, int64_t, int64_t, T*, int);                 \
  template void scatter_add_segments<T>(const T*, int64_t, const int64_t*, const int64_t*,     \
                                        const int64_t*, int64_t, int64_t, T*, int);
PS_INSTANTIATE(float)
PS_INSTANTIATE(double)
#undef PS_INSTANTIATE

}  // namespace ps
