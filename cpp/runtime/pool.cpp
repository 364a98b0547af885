#include "runtime/pool.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace ps {
namespace runtime {
namespace {

constexpr std::size_t kHuge = std::size_t(2) << 20;
constexpr std::size_t kHugeFrom = std::size_t(4) << 20;

struct Kept {
  void* p;
  std::size_t size;
};

// Never destroyed: a tensor freed while the interpreter shuts down may still
// give its block back.
struct Pool {
  std::mutex mu;
  std::vector<Kept> kept;  // oldest first
  PoolState state;
};

Pool& pool() {
  static Pool* p = [] {
    Pool* q = new Pool;
    q->state.limit = std::size_t(256) << 20;
#if defined(__linux__)
    // A fork while another thread holds the lock (a map built ahead on a
    // worker, say) would leave the child's copy locked for ever: the lock is
    // taken around the fork and let go on both sides.
    pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); }, [] { pool().mu.unlock(); });
#endif
    return q;
  }();
  return *p;
}

void release(void* p) { std::free(p); }

// Frees the oldest kept blocks until `room` more bytes fit the limit.
void trim(Pool& pl, std::size_t room) {
  std::size_t i = 0;
  while (i < pl.kept.size() && pl.state.kept + room > pl.state.limit) {
    pl.state.kept -= pl.kept[i].size;
    release(pl.kept[i].p);
    ++i;
  }
  pl.kept.erase(pl.kept.begin(), pl.kept.begin() + static_cast<std::ptrdiff_t>(i));
}

}  // namespace

void* pool_take(std::size_t bytes, std::size_t* size) {
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    // The smallest kept block that serves the request.
    std::size_t best = pl.kept.size();
    for (std::size_t i = 0; i < pl.kept.size(); ++i) {
      const std::size_t s = pl.kept[i].size;
      if (s >= bytes && s - s / kPoolSlack <= bytes && (best == pl.kept.size() || s < pl.kept[best].size)) best = i;
    }
    if (best < pl.kept.size()) {
      const Kept k = pl.kept[best];
      pl.kept.erase(pl.kept.begin() + static_cast<std::ptrdiff_t>(best));
      pl.state.kept -= k.size;
      ++pl.state.hits;
      *size = k.size;
      return k.p;
    }
    ++pl.state.misses;
  }
  const std::size_t align = bytes >= kHugeFrom ? kHuge : 64;
  const std::size_t rounded = (bytes + align - 1) / align * align;
  void* p = nullptr;
  if (rounded < bytes || posix_memalign(&p, align, rounded) != 0 || p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHuge) (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only: a failure changes nothing
#endif
  *size = rounded;
  return p;
}

void pool_give(void* p, std::size_t size) noexcept {
  if (p == nullptr) return;
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  if (size > pl.state.limit) {
    release(p);
    return;
  }
  trim(pl, size);
  try {
    pl.kept.push_back(Kept{p, size});
  } catch (...) {  // (no room for the entry: the block goes back to the system)
    release(p);
    return;
  }
  pl.state.kept += size;
}

// The state with its count of kept blocks (the caller holds the lock).
static PoolState counted(const Pool& pl) {
  PoolState s = pl.state;
  s.blocks = pl.kept.size();
  return s;
}

PoolState pool_limit(std::size_t limit) {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  pl.state.limit = limit;
  trim(pl, 0);
  return counted(pl);
}

PoolState pool_state() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  return counted(pl);
}

}  // namespace runtime
}  // namespace ps
