// Process-wide settings of the runtime the core runs in: glibc's malloc
// thresholds, so that the large buffers every call allocates and frees
// (voxelisation, kernel maps, plans, conv outputs) reuse freed heap memory
// instead of fresh pages that the kernel must fault in and zero.
#include <string>

#include "bind.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace ps {
namespace {

// True where set (glibc); false elsewhere (nothing changed).
bool reuse_freed_memory(bool on, long long bytes) {
#if defined(__GLIBC__)
  // glibc's defaults: 128 KiB for both (mallopt turns its dynamic mmap
  // threshold off either way).
  // Some glibc versions refuse an mmap threshold above 32 MiB (4 MiB x
  // sizeof(long)): then the largest they take.
  const long long limit = on ? bytes : 128 * 1024;
  const long long cap = 4LL * 1024 * 1024 * static_cast<long long>(sizeof(long));
  const bool mmap_set = mallopt(M_MMAP_THRESHOLD, int(limit)) == 1 ||
                        (limit > cap && mallopt(M_MMAP_THRESHOLD, int(cap)) == 1);
  return mmap_set && mallopt(M_TRIM_THRESHOLD, int(limit)) == 1;
#else
  (void)on;
  (void)bytes;
  return false;
#endif
}

}  // namespace

void bind_runtime(pybind11::module_& m) {
  m.def(
      "reuse_freed_memory",
      [](bool on, long long bytes) {
        if (bytes < 0 || bytes > (1LL << 30)) throw pybind11::value_error("bytes must be in [0, 2^30]; got " + std::to_string(bytes));
        return reuse_freed_memory(on, bytes);
      },
      pybind11::arg("on"), pybind11::arg("bytes"),
      "glibc malloc: on, blocks up to `bytes` come from the heap and freed memory up to `bytes` stays in "
      "the process (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); off, glibc's 128 KiB defaults. False where the C "
      "library is not glibc (nothing changed).");
}

}  // namespace ps
