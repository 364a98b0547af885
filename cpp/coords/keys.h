// Packing and unpacking exact coordinate keys (common.h's KeyLayout) over
// flat buffers. Each touches no Python object (run with the GIL released)
// and throws ValueError through value_error after its parallel pass.
#pragma once

#include <cstdint>

#include "common.h"

namespace ps {

// keys[i] of the (n, 4) int32 rows [batch, x, y, z]; ValueError naming the
// first row outside `layout` (then keys holds no meaning).
void pack_rows(const int32_t* coords, int64_t n, const KeyLayout& layout, int64_t* keys, int nt);

// The (n, 4) int32 rows of keys of `layout`; ValueError unless every key is
// one of the layout's with its coordinates in int32.
void unpack_rows(const int64_t* keys, int64_t n, const KeyLayout& layout, int32_t* coords, int nt);

// ValueError naming `name` unless every key is non-negative.
void check_keys(const int64_t* keys, int64_t n, int nt, const char* name);

}  // namespace ps
