// Shared helpers of the pointsparse core: exact 64-bit coordinate keys,
// argument checks, and the OpenMP conventions every kernel follows.
//
// Keys are packed relative to a KeyLayout fitted to the coordinates at hand
// (coords/layout.h): from high to low bits
//   batch                  (bits[0] bits, batch >= 0)
//   x - origin[0]          (bits[1] bits)
//   y - origin[1]          (bits[2] bits)
//   z - origin[2]          (bits[3] bits)
// with bits[0] + .. + bits[3] <= 63, so keys are >= 0 and signed and
// unsigned order agree. Sorting keys sorts rows lexicographically by
// (batch, x, y, z). Adding delta(dx, dy, dz) to a key shifts its coordinates
// exactly as long as every shifted coordinate stays inside the layout's
// fields (no carries): fitted layouts leave a margin for kernel offsets.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace ps {

constexpr int kKeyBits = 63;
constexpr int64_t kCoordMin = std::numeric_limits<int32_t>::min();
constexpr int64_t kCoordMax = std::numeric_limits<int32_t>::max();
constexpr int64_t kBatchMax = std::numeric_limits<int32_t>::max();

inline bool coord_in_range(int64_t c) { return c >= kCoordMin && c <= kCoordMax; }

struct KeyLayout {
  int64_t origin[3] = {0, 0, 0};  // x, y, z of field value 0
  int bits[4] = {0, 0, 0, 0};     // batch, x, y, z
  int64_t shift[4] = {0, 0, 0, 0};  // batch, x, y, z
  int64_t mask[4] = {0, 0, 0, 0};   // largest value of each field

  // Sets the shifts and masks from bits (z lowest).
  void place() {
    shift[3] = 0;
    for (int f = 2; f >= 0; --f) shift[f] = shift[f + 1] + bits[f + 1];
    for (int f = 0; f < 4; ++f) mask[f] = (int64_t(1) << bits[f]) - 1;
  }
  int total_bits() const { return bits[0] + bits[1] + bits[2] + bits[3]; }
  // Largest field value of field f (0: batch, 1..3: x, y, z).
  int64_t field_max(int f) const { return mask[f]; }
  // Whether coordinate c of axis a (0: x) lies in its field.
  bool axis_contains(int a, int64_t c) const {
    return c >= origin[a] && c - origin[a] <= field_max(a + 1);
  }
  // Whether the row lies in the fields (one unsigned compare per field).
  bool contains(int64_t b, int64_t x, int64_t y, int64_t z) const {
    return (uint64_t(b) <= uint64_t(field_max(0))) & (uint64_t(x - origin[0]) <= uint64_t(field_max(1))) &
           (uint64_t(y - origin[1]) <= uint64_t(field_max(2))) & (uint64_t(z - origin[2]) <= uint64_t(field_max(3)));
  }
  // Caller guarantees contains(b, x, y, z) (checked before any parallel region).
  int64_t pack(int64_t b, int64_t x, int64_t y, int64_t z) const {
    return int64_t((uint64_t(b) << shift[0]) | (uint64_t(x - origin[0]) << shift[1]) |
                   (uint64_t(y - origin[1]) << shift[2]) | uint64_t(z - origin[2]));
  }
  // The int32 values each column of a row may hold: [lo32[f], hi32[f]]
  // (lo32 > hi32 when none), so that rows check in int32 lanes.
  void int32_bounds(int32_t* lo32, int32_t* hi32) const {
    const int64_t lo[4] = {0, origin[0], origin[1], origin[2]};
    for (int f = 0; f < 4; ++f) {
      const int64_t hi = lo[f] + mask[f];
      const bool none = lo[f] > kCoordMax || hi < kCoordMin;
      lo32[f] = int32_t(none ? kCoordMax : std::max(lo[f], kCoordMin));
      hi32[f] = int32_t(none ? kCoordMin : std::min(hi, kCoordMax));
    }
  }
  // Field f of a key.
  int64_t field(int64_t key, int f) const { return (key >> shift[f]) & field_max(f); }
  void unpack(int64_t key, int32_t* out4) const {
    out4[0] = int32_t(field(key, 0));
    for (int a = 0; a < 3; ++a) out4[a + 1] = int32_t(field(key, a + 1) + origin[a]);
  }
  // The key delta of a coordinate shift; add it to a key whose shifted
  // coordinates stay in the fields (computed modulo 2^64: exact then).
  int64_t delta(int64_t dx, int64_t dy, int64_t dz) const {
    return int64_t((uint64_t(dx) << shift[1]) + (uint64_t(dy) << shift[2]) + uint64_t(dz));
  }
  // Whether the key's coordinates shifted by (dx, dy, dz) stay in the fields.
  bool key_shift_ok(int64_t key, int64_t dx, int64_t dy, int64_t dz) const {
    const int64_t d[3] = {dx, dy, dz};
    for (int a = 0; a < 3; ++a) {
      const int64_t v = field(key, a + 1) + d[a];
      if (v < 0 || v > field_max(a + 1)) return false;
    }
    return true;
  }
};

// Fewest bits that hold `count` distinct values 0 .. count - 1 (count >= 1):
// the width of count - 1.
inline int bits_for(uint64_t count) {
  int bits = 0;
  while (bits < 64 && (uint64_t(1) << bits) < count) ++bits;
  return bits;
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

// Streaming loops (a read and a write per row, little arithmetic: packing,
// bounds, checks, scatters of an index) run on one thread below this many
// rows: 1M rows take about a millisecond on one core, and a team's barrier on
// a busy machine can cost a whole time slice.
constexpr int64_t kStreamParallelMin = int64_t(1) << 20;
inline int stream_threads(int requested, int64_t rows) { return rows < kStreamParallelMin ? 1 : threads(requested); }

[[noreturn]] inline void value_error(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace ps
