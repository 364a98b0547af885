// Fitting a KeyLayout (common.h) to coordinates: the bounds of their columns,
// the fewest bits per field that hold them, and the messages that name a
// span or a row that does not fit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace ps {

// Smallest and largest value of each column (batch, x, y, z); lo > hi: no rows.
struct Bounds {
  int64_t lo[4], hi[4];
  Bounds();
  bool empty() const { return lo[0] > hi[0]; }
  void merge(const Bounds& other);
};

// Bounds of (n, 4) int32 rows; first_negative_batch: the first row whose
// batch is negative, or -1.
Bounds coords_bounds(const int32_t* coords, int64_t n, int nt, int64_t* first_negative_batch);

// The layout of the rows within `bounds` (batch >= 0), with margin[a] spare
// values on both sides of axis a when the key still fits kKeyBits (else with
// none). ValueError naming the span when not even the rows fit.
KeyLayout fit_layout(const Bounds& bounds, const int64_t* margin);

// The same; ValueError naming the first row (as "<name> row i") whose batch
// is negative. Touches no Python object: call it with the GIL released.
Bounds checked_bounds(const int32_t* coords, int64_t n, const char* name, int nt);

// A layout handed in from Python as (origin x, y, z, bits batch, x, y, z);
// ValueError when malformed.
KeyLayout layout_from(const std::vector<int64_t>& fields);
std::vector<int64_t> layout_fields(const KeyLayout& layout);

// "[b, x, y, z]" of a row, and the ranges a layout holds, for messages.
std::string row_str(const int32_t* row);
std::string layout_str(const KeyLayout& layout);

}  // namespace ps
