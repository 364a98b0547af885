// Shared helpers of the pointsparse core: exact 64-bit coordinate keys,
// argument checks, and the OpenMP conventions every kernel follows.
//
// Key layout (int64, always >= 0, so signed and unsigned order agree):
//   bits 51..62  batch        (12 bits, 0 .. 4095)
//   bits 34..50  x + 2^16     (17 bits, x in -65536 .. 65535)
//   bits 17..33  y + 2^16
//   bits  0..16  z + 2^16
// Sorting keys sorts rows lexicographically by (batch, x, y, z). Adding
// ((dx << 34) + (dy << 17) + dz) to a key shifts its coordinates exactly as
// long as every shifted coordinate stays inside the range (no carries).
#pragma once

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ps {

constexpr int kCoordBits = 17;
constexpr int kBatchBits = 12;
constexpr int64_t kCoordBias = int64_t(1) << (kCoordBits - 1);   // 65536
constexpr int64_t kCoordMin = -kCoordBias;                         // -65536
constexpr int64_t kCoordMax = kCoordBias - 1;                      //  65535
constexpr int64_t kBatchMax = (int64_t(1) << kBatchBits) - 1;     //  4095
constexpr int64_t kCoordMask = (int64_t(1) << kCoordBits) - 1;
constexpr int kShiftZ = 0;
constexpr int kShiftY = kCoordBits;
constexpr int kShiftX = 2 * kCoordBits;
constexpr int kShiftB = 3 * kCoordBits;

inline bool coord_in_range(int64_t c) { return c >= kCoordMin && c <= kCoordMax; }
inline bool batch_in_range(int64_t b) { return b >= 0 && b <= kBatchMax; }

// Caller guarantees the ranges (checked before any parallel region).
inline int64_t pack_key(int64_t b, int64_t x, int64_t y, int64_t z) {
  return (b << kShiftB) | ((x + kCoordBias) << kShiftX) |
         ((y + kCoordBias) << kShiftY) | ((z + kCoordBias) << kShiftZ);
}

// The key delta of a coordinate shift; add it to a key whose shifted
// coordinates stay in range.
inline int64_t key_delta(int64_t dx, int64_t dy, int64_t dz) {
  return dx * (int64_t(1) << kShiftX) + dy * (int64_t(1) << kShiftY) + dz;
}

inline void unpack_key(int64_t key, int32_t* out4) {
  out4[0] = int32_t(key >> kShiftB);
  out4[1] = int32_t(((key >> kShiftX) & kCoordMask) - kCoordBias);
  out4[2] = int32_t(((key >> kShiftY) & kCoordMask) - kCoordBias);
  out4[3] = int32_t(((key >> kShiftZ) & kCoordMask) - kCoordBias);
}

// Floor division for the quantisation of negative coordinates.
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

// Thread count for one call: the caller passes torch.get_num_threads() (or
// POINTSPARSE_NUM_THREADS); anything below 1 means 1, and no call starts more
// threads than the processors it may run on (a runaway request would
// exhaust the OpenMP runtime's stacks and take the process down).
inline int threads(int requested) {
  static const int procs = omp_get_num_procs() < 1 ? 1 : omp_get_num_procs();
  return requested < 1 ? 1 : (requested > procs ? procs : requested);
}

// Below this much work (rows, or rows x channels) a call runs on one thread:
// waking a team costs more than the work, and on a busy machine a team can
// wait a whole time slice for its second thread. Results do not depend on it.
constexpr int64_t kParallelMin = int64_t(1) << 14;
inline int threads(int requested, int64_t work) { return work < kParallelMin ? 1 : threads(requested); }

[[noreturn]] inline void value_error(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace ps
