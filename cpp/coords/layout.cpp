#include "coords/layout.h"

#include <omp.h>

#include <algorithm>
#include <limits>

namespace ps {
namespace {

// Fewest bits that hold `count` distinct values (count >= 1).
int bits_for(uint64_t count) {
  int bits = 0;
  while (bits < 64 && (uint64_t(1) << bits) < count) ++bits;
  return bits;
}

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
  int64_t lb = std::numeric_limits<int64_t>::max(), lx = lb, ly = lb, lz = lb, neg = lb;
  int64_t hb = std::numeric_limits<int64_t>::min(), hx = hb, hy = hb, hz = hb;
#pragma omp parallel for num_threads(threads(nt, n)) schedule(static) \
    reduction(min : lb, lx, ly, lz, neg) reduction(max : hb, hx, hy, hz)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* r = c + 4 * i;
    lb = std::min<int64_t>(lb, r[0]), hb = std::max<int64_t>(hb, r[0]);
    lx = std::min<int64_t>(lx, r[1]), hx = std::max<int64_t>(hx, r[1]);
    ly = std::min<int64_t>(ly, r[2]), hy = std::max<int64_t>(hy, r[2]);
    lz = std::min<int64_t>(lz, r[3]), hz = std::max<int64_t>(hz, r[3]);
    if (r[0] < 0) neg = std::min(neg, i);
  }
  Bounds b;
  const int64_t l[4] = {lb, lx, ly, lz}, h[4] = {hb, hx, hy, hz};
  std::copy(l, l + 4, b.lo);
  std::copy(h, h + 4, b.hi);
  *first_negative_batch = neg == std::numeric_limits<int64_t>::max() ? -1 : neg;
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
