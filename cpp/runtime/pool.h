// The engine's pool of output memory: the outputs the convolutions write
// (tens of MB on a full sweep) come from blocks that earlier outputs freed,
// so that a repeated call does not fault in and zero fresh pages. glibc gives
// a block over its mmap threshold (at most 32 MiB) fresh pages on every
// allocation; on the 2-core Xeon a 91k x 128 float32 output faulted in that
// way cost a vector-sparse conv more than its kernels (bench/RESULTS.md,
// "Stop 59"). Blocks are kept up to a byte limit (pool_limit), the oldest
// freed first beyond it; only the engine's own outputs come from here, the
// rest of the process allocates as before.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ps {
namespace runtime {

// Which outputs come from here is the Python side's choice
// (pointsparse._ext.POOL_MIN_BYTES: those over glibc's largest mmap threshold).
// A kept block serves a request of at least size - size / kPoolSlack bytes.
constexpr std::size_t kPoolSlack = 8;

struct PoolState {
  std::size_t limit = 0;   // the most bytes kept
  std::size_t kept = 0;    // bytes kept now (freed blocks waiting for a request)
  std::size_t blocks = 0;  // blocks kept now (counted when the state is read)
  std::uint64_t hits = 0;    // requests served by a kept block
  std::uint64_t misses = 0;  // requests that allocated
};

// A block of at least `bytes` (64-byte aligned; from 4 MiB, 2 MiB aligned and
// advised into huge pages): a kept one that fits, else a new allocation
// (std::bad_alloc where none). `*size` receives its real size, which
// pool_give takes back.
void* pool_take(std::size_t bytes, std::size_t* size);
// The block back: kept while the limit allows (older ones freed first to make
// room), else freed.
void pool_give(void* p, std::size_t size) noexcept;
// Sets the limit (freeing kept blocks beyond it) and returns the state after.
PoolState pool_limit(std::size_t limit);
PoolState pool_state();

}  // namespace runtime
}  // namespace ps
