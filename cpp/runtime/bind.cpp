// Process-wide settings of the runtime the core runs in: glibc's malloc
// thresholds, so that the large buffers every call allocates and frees
// (voxelisation, kernel maps, plans, conv outputs) reuse freed heap memory
// instead of fresh pages that the kernel must fault in and zero.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "array.h"
#include "bind.h"
#include "runtime/pool.h"

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

struct PooledBlock {
  void* p;
  std::size_t size;
};

// An uninitialised C-contiguous array of `shape` and `dtype` whose memory comes
// from the output pool and goes back to it when the array (and whatever
// holds it, a torch tensor made by torch.from_numpy) is freed.
// Only dtypes of plain numbers: the memory is uninitialised, and an object
// field (anywhere in a structured dtype) would be read as Python object
// pointers when the array is shown or freed (a crash), unicode as code points
// (SystemError).
py::array pooled_empty(const std::vector<long long>& shape, const py::dtype& dtype) {
  const char kind = dtype.kind();
  if (kind != 'b' && kind != 'i' && kind != 'u' && kind != 'f' && kind != 'c')
    throw py::value_error("dtype must be a bool, integer, float or complex dtype (the pool's memory is "
                          "uninitialised); got " + py::str(static_cast<const py::object&>(dtype)).cast<std::string>());
  const long long item = static_cast<long long>(dtype.itemsize());
  if (item <= 0) throw py::value_error("dtype must have a positive item size");
  long long count = 1;
  const long long most = std::numeric_limits<long long>::max() / item;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw py::value_error("shape[" + std::to_string(i) + "] must be >= 0; got " + std::to_string(shape[i]));
    if (shape[i] != 0 && count > most / shape[i]) throw py::value_error("shape holds more bytes than a process can address");
    count *= shape[i];
  }
  if (count == 0) throw py::value_error("shape must hold at least one element (an empty array needs no pool)");
  std::size_t size = 0;
  void* p = runtime::pool_take(static_cast<std::size_t>(count * item), &size);
  PooledBlock* block = nullptr;
  try {
    block = new PooledBlock{p, size};
  } catch (...) {
    runtime::pool_give(p, size);
    throw;
  }
  py::capsule base(block, [](void* b) {
    PooledBlock* blk = static_cast<PooledBlock*>(b);
    runtime::pool_give(blk->p, blk->size);
    delete blk;
  });
  std::vector<py::ssize_t> dims(shape.begin(), shape.end()), strides(shape.size());
  py::ssize_t step = static_cast<py::ssize_t>(item);
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = step;
    step *= dims[i] ? dims[i] : 1;
  }
  return py::array(dtype, dims, strides, p, base);
}

py::dict pool_dict(const runtime::PoolState& s) {
  py::dict d;
  d["max_bytes"] = s.limit;
  d["kept_bytes"] = s.kept;
  d["kept_blocks"] = s.blocks;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  return d;
}

}  // namespace

void bind_runtime(pybind11::module_& m) {
  m.def("pooled_empty", &pooled_empty, pybind11::arg("shape"), pybind11::arg("dtype"),
        "An uninitialised C-contiguous array from the output pool (its memory goes back to the pool when "
        "the array is freed). ValueError for a negative or empty shape, or a dtype other than bool, integer, "
        "float or complex.");
  m.def(
      "output_pool",
      [](long long limit) {
        if (limit < -1) throw pybind11::value_error("limit must be >= 0 (or -1: unchanged); got " + std::to_string(limit));
        return pool_dict(limit < 0 ? runtime::pool_state() : runtime::pool_limit(static_cast<std::size_t>(limit)));
      },
      pybind11::arg("limit"),
      "The output pool's state after setting its limit in bytes (-1: unchanged; 0: keep nothing): a dict of "
      "max_bytes, kept_bytes, kept_blocks, hits, misses.");
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
