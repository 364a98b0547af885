// Per-thread scratch memory kept between calls, for a call's temporaries
// (the quantised points and keys of a voxelisation, the scatter buffers of a
// radix sort). Memory freed at the end of a call goes back to the system
// when glibc trims its heap, and the next call faults every page of it in
// again, zeroed by the kernel: on the KITTI sweep (120k points) a
// voxelisation faulted some 700 pages a call (bench/RESULTS.md "Stop 28",
// with the voxelisation's time before and after). A slot keeps its buffer for the
// calling thread (grown when too small, never shrunk) up to kScratchKeep
// bytes; a larger request gets memory of its own, freed with the Scratch.
// Each slot has one user at a time: a slot is named after the one function
// that takes it, and no function holding a slot calls another that takes
// the same one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace ps {

enum ScratchSlot : int {
  kScratchQuantized = 0,  // voxelize: the points' voxels (3 int32 a point)
  kScratchKeys,           // voxelize: the points' keys
  kScratchSortKeys,       // radix sort: the keys' scatter buffer
  kScratchSortRows,       // radix sort: the rows' scatter buffer
  kScratchSlots
};

// The largest buffer a slot keeps for its thread (a larger one is freed
// after its call): 64 MiB, 8M keys.
constexpr std::size_t kScratchKeep = std::size_t(64) << 20;

struct ScratchKept {
  std::unique_ptr<unsigned char[]> buffer;
  std::size_t bytes = 0;
};
// The calling thread's slots (one set for every element type).
inline ScratchKept* scratch_slots() {
  thread_local ScratchKept slots[kScratchSlots];
  return slots;
}

template <typename T>
class Scratch {
 public:
  // Room for n T's (uninitialised); n <= 0 gives a null pointer.
  Scratch(ScratchSlot slot, int64_t n) {
    if (n <= 0) return;
    const std::size_t bytes = std::size_t(n) * sizeof(T);
    if (bytes > kScratchKeep) {
      own_.reset(new unsigned char[bytes]);
      p_ = reinterpret_cast<T*>(own_.get());
      return;
    }
    ScratchKept& k = scratch_slots()[slot];
    if (k.bytes < bytes) {
      k.buffer.reset();  // the old one first: never both at once
      k.bytes = 0;
      k.buffer.reset(new unsigned char[bytes]);
      k.bytes = bytes;
    }
    p_ = reinterpret_cast<T*>(k.buffer.get());
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  std::unique_ptr<unsigned char[]> own_;
  T* p_ = nullptr;
};

}  // namespace ps
