// Large outputs in transparent huge pages: an output of the engine is written
// once from fresh memory (a new torch tensor of tens of MB is its own mmap),
// and faulting it in 4 KiB pages costs more than the convolution's smaller
// offsets: 22 ms for the 46 MB of a 91k x 128 float32 output on Zen 4, 5 ms
// in 2 MiB pages. Linux only (elsewhere nothing is done).
#pragma once

#include <cstddef>

namespace ps {
namespace conv {

// Outputs of at least this many bytes are advised (two huge pages, so that
// at least one whole 2 MiB page lies inside).
constexpr std::size_t kHugePageMinBytes = std::size_t(4) << 20;

// madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [p, p + bytes),
// before they are first written: the faults then map 2 MiB at a time. Only
// advice (torch's own THP_MEM_ALLOC_ENABLE does the same per allocation):
// pages already present stay as they are, a failure is ignored, the values
// are untouched.
void prefer_huge_pages(void* p, std::size_t bytes);

}  // namespace conv
}  // namespace ps
