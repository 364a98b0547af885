#include "coords/layout.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <limits>

namespace ps {
namespace {

const char* const kAxis[4] = {"batch", "x", "y", "z"};

// Layout of `bounds` widened by margin[a] on both sides of axis a (no check
// of the total).
KeyLayout layout_with(const Bounds& b, const int64_t* margin) {
  KeyLayout out;
  if (b.empty()) return out;
  out.bits[0] = bits_for(uint64_t(b.hi[0]) + 1);
  for (int a = 0; a < 3; ++a) {
    out.origin[a] = b.lo[a + 1] - margin[a];
    out.bits[a + 1] = bits_for(uint64_t(b.hi[a + 1] - b.lo[a + 1]) + 1 + 2 * uint64_t(margin[a]));
  }
  out.place();
  return out;
}

}  // namespace

Bounds::Bounds() {
  std::fill(lo, lo + 4, std::numeric_limits<int64_t>::max());
  std::fill(hi, hi + 4, std::numeric_limits<int64_t>::min());
}

void Bounds::merge(const Bounds& other) {
  for (int f = 0; f < 4; ++f) {
    lo[f] = std::min(lo[f], other.lo[f]);
    hi[f] = std::max(hi[f], other.hi[f]);
  }
}

Bounds coords_bounds(const int32_t* c, int64_t n, int nt, int64_t* first_negative_batch) {
  // Per-thread int32 lanes (the compiler vectorises the 4 columns), merged
  // in thread order.
  const int team = stream_threads(nt, n);
  std::vector<std::array<int32_t, 8>> part(team);
  for (auto& p : part)
    for (int f = 0; f < 4; ++f) {
      p[f] = std::numeric_limits<int32_t>::max();
      p[4 + f] = std::numeric_limits<int32_t>::min();
    }
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num(), size = omp_get_num_threads();
    int32_t lo[4], hi[4];
    for (int f = 0; f < 4; ++f) lo[f] = part[t][f], hi[f] = part[t][4 + f];
    const int64_t end = n * (t + 1) / size;
    for (int64_t i = n * t / size; i < end; ++i)
      for (int f = 0; f < 4; ++f) {
        lo[f] = std::min(lo[f], c[4 * i + f]);
        hi[f] = std::max(hi[f], c[4 * i + f]);
      }
    for (int f = 0; f < 4; ++f) part[t][f] = lo[f], part[t][4 + f] = hi[f];
  }
  Bounds b;
  if (n > 0)  // without rows the bounds stay empty
    for (const auto& p : part)
      for (int f = 0; f < 4; ++f) {
        b.lo[f] = std::min<int64_t>(b.lo[f], p[f]);
        b.hi[f] = std::max<int64_t>(b.hi[f], p[4 + f]);
      }
  *first_negative_batch = -1;
  if (n > 0 && b.lo[0] < 0)
    for (int64_t i = 0; i < n && *first_negative_batch < 0; ++i)
      if (c[4 * i] < 0) *first_negative_batch = i;
  return b;
}

Bounds checked_bounds(const int32_t* c, int64_t n, const char* name, int nt) {
  int64_t negative;
  const Bounds b = coords_bounds(c, n, nt, &negative);
  if (negative >= 0)
    value_error(std::string(name) + " row " + std::to_string(negative) + " = " + row_str(c + 4 * negative) +
                " has a negative batch index");
  return b;
}

KeyLayout fit_layout(const Bounds& b, const int64_t* margin) {
  if (!b.empty() && b.lo[0] < 0)
    value_error("batch indices must be >= 0; the smallest is " + std::to_string(b.lo[0]));
  for (int a = 0; a < 3; ++a)
    if (margin[a] < 0 || margin[a] > (int64_t(1) << 32))
      value_error("key margin must lie in [0, 2^32]; got " + std::to_string(margin[a]));
  KeyLayout out = layout_with(b, margin);
  if (out.total_bits() <= kKeyBits) return out;
  const int64_t none[3] = {0, 0, 0};
  out = layout_with(b, none);
  if (out.total_bits() <= kKeyBits) return out;
  std::string msg = "coordinates span";
  for (int f = 0; f < 4; ++f)
    msg += std::string(f ? ", " : " ") + kAxis[f] + " [" + std::to_string(f ? b.lo[f] : 0) + ", " +
           std::to_string(b.hi[f]) + "] (" + std::to_string(out.bits[f]) + " bits)";
  msg += ": " + std::to_string(out.total_bits()) + " bits in all, but a coordinate key holds " +
         std::to_string(kKeyBits) + " (the batch count and the x, y, z spans must fit together; "
         "split the batch or shrink the extent)";
  value_error(msg);
}

KeyLayout layout_from(const std::vector<int64_t>& v) {
  if (v.size() != 7) value_error("layout must have 7 entries (origin x, y, z, bits batch, x, y, z)");
  KeyLayout out;
  int total = 0;
  for (int f = 0; f < 4; ++f) {
    if (v[3 + f] < 0 || v[3 + f] > 62) value_error("layout bits must lie in [0, 62]");
    out.bits[f] = int(v[3 + f]);
    total += out.bits[f];
  }
  if (total > kKeyBits) value_error("layout bits must add up to at most " + std::to_string(kKeyBits));
  for (int a = 0; a < 3; ++a) {
    if (v[a] < -(int64_t(1) << 40) || v[a] > (int64_t(1) << 40))
      value_error("layout origin must lie within +-2^40");
    out.origin[a] = v[a];
  }
  out.place();
  return out;
}

std::vector<int64_t> layout_fields(const KeyLayout& l) {
  return {l.origin[0], l.origin[1], l.origin[2], l.bits[0], l.bits[1], l.bits[2], l.bits[3]};
}

std::string row_str(const int32_t* r) {
  return "[" + std::to_string(r[0]) + ", " + std::to_string(r[1]) + ", " + std::to_string(r[2]) + ", " +
         std::to_string(r[3]) + "]";
}

std::string layout_str(const KeyLayout& l) {
  std::string s = "batch in [0, " + std::to_string(l.field_max(0)) + "]";
  for (int a = 0; a < 3; ++a)
    s += std::string(", ") + kAxis[a + 1] + " in [" + std::to_string(l.origin[a]) + ", " +
         std::to_string(l.origin[a] + l.field_max(a + 1)) + "]";
  return s;
}

}  // namespace ps
