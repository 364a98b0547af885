// Packing and unpacking coordinate keys (keys.h).
#include "coords/keys.h"

#include <omp.h>

#include <string>

#include "coords/layout.h"

namespace ps {

void pack_rows(const int32_t* c, int64_t n, const KeyLayout& layout, int64_t* k, int nt) {
  int32_t lo[4], hi[4];
  layout.int32_bounds(lo, hi);
  int bad = 0;
  {
    // One pass: pack every row, note whether any lies outside the layout
    // (then no key is returned); the check in int32 lanes vectorises.
#pragma omp parallel for num_threads(nt) reduction(| : bad) schedule(static) firstprivate(layout, lo, hi)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* r = c + 4 * i;
      for (int f = 0; f < 4; ++f) bad |= (r[f] < lo[f]) | (r[f] > hi[f]);
      k[i] = layout.pack(r[0], r[1], r[2], r[3]);
    }
  }
  if (bad) {
    int64_t row = 0;
    while (row + 1 < n && layout.contains(c[4 * row], c[4 * row + 1], c[4 * row + 2], c[4 * row + 3])) ++row;
    value_error("coords row " + std::to_string(row) + " = " + row_str(c + 4 * row) +
                " lies outside the key layout: " + layout_str(layout));
  }
}

void unpack_rows(const int64_t* k, int64_t n, const KeyLayout& layout, int32_t* c, int nt) {
  // Keys of the layout: below 2^total_bits (one OR over the high bits), and
  // their coordinates within int32 (checked per row only when a field of the
  // layout reaches past int32).
  const int total = layout.total_bits();
  bool wide = false;
  for (int a = 0; a < 3; ++a)
    wide = wide || !coord_in_range(layout.origin[a]) || !coord_in_range(layout.origin[a] + layout.field_max(a + 1));
  uint64_t high = 0;
  int64_t bad = 0;
  {
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(layout) reduction(| : high)
    for (int64_t i = 0; i < n; ++i) {
      high |= uint64_t(k[i]) >> total;
      layout.unpack(k[i], c + 4 * i);
    }
    if (wide && !high) {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : bad)
      for (int64_t i = 0; i < n; ++i)
        for (int a = 0; a < 3; ++a) bad += !coord_in_range(layout.field(k[i], a + 1) + layout.origin[a]);
    }
  }
  bad += high != 0;
  if (bad) value_error("keys must be keys of the layout (" + layout_str(layout) + ") of int32 coordinates");
}

void check_keys(const int64_t* k, int64_t n, int nt, const char* name) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(nt) reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad += (k[i] < 0);
  if (bad) value_error(std::string(name) + " must be non-negative packed coordinate keys");
}

}  // namespace ps
