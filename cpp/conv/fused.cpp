// Runtime dispatch of the fused convolution kernels (see fused.h): the scratch
// whose size depends on the register tile is sized here for the build that
// runs, so a caller cannot size it for another.
#include "conv/fused.h"

#include <atomic>
#include <memory>
#include <vector>

namespace ps {
namespace conv {
namespace {

// Whether the avx2 apply kernels serve a product of `cols` columns asked of
// the avx512 ones: a product one 32-byte vector wide (8 floats, 4 doubles),
// which the avx512 tile would run as one half-empty masked vector with the
// same FMAs (tile_panels_full's kPart). Measured on an AMD EPYC Zen 5 (KITTI
// sweep, k = 3, one thread, forward, avx512 / avx2 ms): C = 8 0.9 / 0.8,
// 24 2.6 / 3.2, 40 5.5 / 8.0 (bench/RESULTS.md stop 50). Both builds' sums
// are the same bits.
template <typename T>
bool narrow_tail(int64_t cols) {
  return cols * int64_t(sizeof(T)) == 32;
}

template <typename T>
void apply_with(ApplyArgs<T> a, Isa isa) {
  if (isa == Isa::avx512 && narrow_tail<T>(a.cols) && isa_runs(Isa::avx2)) isa = Isa::avx2;
  const int64_t K = a.pairs.kernel_volume;
  const int64_t size = wpack_size<T>(isa, K, a.kc, a.cols);
  std::unique_ptr<T[]> wpack(new T[size_t(size > 0 ? size : 1)]);  // pack_weights writes every element
  a.wpack = wpack.get();
  std::unique_ptr<T[]> blocks;
  attach_blocks(a, isa, blocks);
  switch (isa) {
    case Isa::avx512: avx512::apply(a); break;
    case Isa::avx2: avx2::apply(a); break;
    default: generic::apply(a); break;
  }
}

template <typename T>
void wgrad_with(WgradArgs<T> a, Isa isa) {
  std::vector<T> scratch(size_t(a.nt * wgrad_scratch<T>(isa, a.c_in, a.c_out)));
  a.scratch = scratch.data();
  switch (isa) {
    case Isa::avx512: avx512::wgrad(a); break;
    case Isa::avx2: avx2::wgrad(a); break;
    default: generic::wgrad(a); break;
  }
}

std::atomic<int64_t> g_stream_bytes{kStreamBytes};
std::atomic<int64_t> g_stream_auto_bytes{-1};  // -1: not set, the CPU's default
thread_local bool g_streamed = false;          // last_streamed()

// kStreamAutoBytes where it was measured (the avx512 build at full width:
// avx512_full_width(), an Intel Xeon and an AMD Zen 5), else never.
int64_t default_stream_auto_bytes() { return avx512_full_width() ? kStreamAutoBytes : kStreamBytes; }

template <typename T>
void attach_blocks_with(ApplyArgs<T>& a, Isa isa, std::unique_ptr<T[]>& owner) {
  const int64_t vb = tile_shape(isa).vec_bytes, row_bytes = a.cols * int64_t(sizeof(T));
  const int64_t bytes = a.num_rows * row_bytes;
  // The offset-pruned forward's own threshold where it was measured: the
  // avx512 build's float32 kernels.
  const bool marked = a.stream && isa == Isa::avx512 && sizeof(T) == 4 && bytes >= stream_auto_bytes();
  g_streamed = false;
  if ((bytes < stream_bytes() && !marked) || row_bytes % vb != 0 || reinterpret_cast<uintptr_t>(a.dst) % vb != 0)
    return;
  g_streamed = true;
  a.blocks = aligned_scratch(owner, int64_t(a.nt) * 2 * kBlockRows * a.cols);  // written before read
}

}  // namespace

void attach_blocks(ApplyArgs<float>& a, Isa isa, std::unique_ptr<float[]>& owner) { attach_blocks_with(a, isa, owner); }
void attach_blocks(ApplyArgs<double>& a, Isa isa, std::unique_ptr<double[]>& owner) {
  attach_blocks_with(a, isa, owner);
}

int64_t stream_bytes() { return g_stream_bytes.load(std::memory_order_relaxed); }
int64_t set_stream_bytes(int64_t bytes) { return g_stream_bytes.exchange(bytes); }
bool last_streamed() { return g_streamed; }
int64_t stream_auto_bytes() {
  const int64_t v = g_stream_auto_bytes.load(std::memory_order_relaxed);
  return v >= 0 ? v : default_stream_auto_bytes();
}
int64_t set_stream_auto_bytes(int64_t bytes) {
  const int64_t v = g_stream_auto_bytes.exchange(bytes);
  return v >= 0 ? v : default_stream_auto_bytes();
}

void apply(ApplyArgs<float> a, Isa isa) { apply_with(a, isa); }
void apply(ApplyArgs<double> a, Isa isa) { apply_with(a, isa); }
void wgrad(WgradArgs<float> a, Isa isa) { wgrad_with(a, isa); }
void wgrad(WgradArgs<double> a, Isa isa) { wgrad_with(a, isa); }

}  // namespace conv
}  // namespace ps
