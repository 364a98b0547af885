// The fused gather-GEMM-scatter convolution: no gathered buffer, no separate
// scatter. Register tiles of kMR pairs x (two vectors of columns) read their
// input rows straight from the feature matrix and add into their output rows.
//
// Pairs come as a PairList: per kernel offset k the pairs
// [ptr[k], ptr[k+1]) with `row` (the side written, strictly increasing within
// an offset) and `col` (the side read). The writer of row r is the thread that
// owns the block of rows containing r (blocks of kBlockRows, fixed), and every
// row adds its offsets' contributions in a fixed order (the identity offset
// of a submanifold map first, then the others in offset order), each contribution a
// fixed-order sum over the channels: results do not depend on the thread
// count, and no two threads ever write one row.
//
// Callers check every index and size first (conv::Plan in plan.h and
// bind.cpp); the kernels trust them. Scratch that depends on the register
// tile is allocated by the dispatch (fused.cpp) for the build it runs, outside the per-ISA
// builds (fused_kernels.h must not instantiate std templates, see
// spmm/kernels.h).
#pragma once

#include <cstdint>
#include <memory>

#include "isa.h"

namespace ps {
namespace conv {

struct PairList {
  const int32_t* row;  // written side, strictly increasing within an offset
  const int32_t* col;  // read side
  const int64_t* ptr;  // kernel_volume + 1
  // (blocks + 1, kernel_volume): cuts[b][k] = first pair of offset k whose
  // row is >= b * kBlockRows (blocks of the written rows).
  const int64_t* cuts;
  int64_t kernel_volume;
  // The identity offset of a submanifold map, or -1: its pairs (r, r) are not
  // in the lists (ptr[k] == ptr[k+1]); the kernels run it as a plain matmul
  // over contiguous rows, no indices read.
  int64_t identity;
};

// dst = bias + sum over offsets k of (dst[row] += src[col] @ B_k) with B_k =
// W[k] (transpose false; kc = C_in, cols = C_out) or W[k]^T (transpose true;
// kc = C_out, cols = C_in). W is (K, C_in, C_out) row-major; bias (cols) may
// be null (zero). Every row of dst is written.
template <typename T>
struct ApplyArgs {
  const T* src;   // (rows of the read side, kc)
  const T* w;     // (K, C_in, C_out)
  const T* bias;  // (cols) or null
  T* dst;         // (num_rows, cols)
  T* wpack;       // scratch: wpack_size(isa, K, kc, cols), set by the dispatch
  int64_t kc, cols, num_rows;
  bool transpose;
  PairList pairs;
  int nt;
  // Inference epilogue on each block's rows once all its offsets are in
  // (still in cache): dst += add (a residual, (num_rows, cols), not
  // overlapping dst), then dst = max(dst, 0) with relu; NaN stays NaN.
  bool relu = false;
  const T* add = nullptr;
  // Scratch of nt * 2 * kBlockRows * cols elements at a 64-byte boundary, or null
  // (set by the dispatch: attach_blocks): each block's rows are
  // summed there, in L2, and then written to dst with streaming stores, so
  // that dst's lines are never read before they are written.
  T* blocks = nullptr;
  // Marked by run_apply (streams_output in plan.h): the output is streamed
  // from stream_auto_bytes() on, whatever stream_bytes() says, in the avx512
  // build's float32 kernels (attach_blocks).
  bool stream = false;
};

// grad_w[k] = x[col]^T @ g[row] summed over the pairs of offset k (every
// k is written). Units are ranges of row blocks: units[u] .. units[u + 1] (fixed by
// the map and the channels, never by the thread count); each unit sums into
// its own partial (K, c_in, c_out) and the partials are added in unit order.
template <typename T>
struct WgradArgs {
  const T* x;        // (rows of the read side, c_in)
  const T* g;        // (num_rows, c_out)
  T* grad_w;         // (K, c_in, c_out)
  T* partials;       // scratch: num_units * K * c_in * c_out
  T* scratch;        // scratch: nt * wgrad_scratch(isa, c_in, c_out), set by the dispatch
  const int64_t* units;  // num_units + 1 row-block boundaries
  int64_t num_units, c_in, c_out, num_rows;
  PairList pairs;
  int nt;
};

// Written rows per work block. 512 rather than 256: on Zen 4 (KITTI sweep,
// one thread, C = 64 and 128) the dense forward ran 2-5% faster and the
// offset-pruned one (75% of the offsets) 7-11% faster (fewer short tails of
// pairs per offset and block); the block (128 or 256 KB at C = 64 or 128
// floats) stays in L2.
constexpr int64_t kBlockRows = 512;
constexpr int64_t kUnitPairs = 65536;  // pairs per weight-gradient unit (at least, on large maps)
constexpr int64_t kMinUnits = 16;      // units a smaller map is cut into
constexpr int64_t kWgradBlocks = 2;    // row blocks per weight-gradient step
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // cap on all units' partials
constexpr int64_t kKC = 64;         // pairs per packed weight-gradient panel
constexpr int64_t kWC = 128;          // pairs per step of the unpacked weight gradient

// Output bytes from which the apply kernels sum each block of rows in a
// scratch block and stream it to dst (ApplyArgs::blocks): a large output
// leaves the caches anyway before anything reads it, and written in place
// each of its lines is first read from memory (a write-allocate) and written
// back later; streamed it is written once. Off by default (no output is that
// large): on AMD EPYC Zen 3 [avx2] (bench/stream_output.py, 16 MB) it was
// neither reliably faster nor slower, vectors 75% at C = 64 0.96-1.17x,
// the full-width MinkUNet 0.94-1.05x from one run to the next (16-byte
// stores); with the AVX2 build's 32-byte stores 0.87-1.03x at C = 64 and
// 128 (stream_output_zen3_ymm.md).
constexpr int64_t kStreamBytes = int64_t(1) << 62;
// But a forward whose kept offsets leave out the identity of a submanifold
// map and run no more pairs than it has output rows (offset pruning: one
// pair a row on average) streams outputs from 8 MiB (plan.h: streams_output;
// the avx512 build's float32 forward, as measured): its rows start as the bias and
// take a few sparse additions each, so write-allocating them costs as much
// as the products. Measured on an Intel Xeon [avx512 amx] (KITTI sweep,
// offsets 75% pruned, bench/stream_output.py --chain --mb 8, four runs, 1 and
// 2 threads): the conv alone 1.15-1.26x, followed by a conv reading its
// output 1.02-1.16x (one 0.97x) at C = 32 and 64; with the identity kept,
// 0.95-1.04x (not streamed); an unpruned conv 0.94-0.98x. The default on
// a CPU running the avx512 build at full width (avx512_full_width(): as
// measured on an Intel Xeon, and on an AMD EPYC Zen 5, bench/stream_output.py
// --chain --mb 8, 2 threads: the conv alone 1.17-1.35x, chained 1.10-1.22x);
// elsewhere never (kStreamBytes): on an AMD EPYC Zen 4, whose 512-bit FMAs
// run in halves, the same command (stop 68) gave 0.96x alone, 0.98x followed
// by the unpruned conv and 0.97x by itself at C = 64 (1.18x / 0.96x / 1.00x
// at C = 32), so its outputs stay in place (the rule is the avx512 build's).
constexpr int64_t kStreamAutoBytes = int64_t(8) << 20;
// The threshold in force (kStreamBytes unless set; process-wide, for tests
// and benchmarks: _core.conv_stream_bytes). set_stream_bytes returns the one
// it replaces.
int64_t stream_bytes();
int64_t set_stream_bytes(int64_t bytes);
// The same for kStreamAutoBytes (_core.conv_stream_auto_bytes).
int64_t stream_auto_bytes();
int64_t set_stream_auto_bytes(int64_t bytes);
// Whether the last apply (forward or input gradient) the calling thread ran
// streamed its output (tests and benchmarks: _core.conv_streamed).
bool last_streamed();

// The register tile of each build: `mr` pairs (rows) x two vectors of
// `vec_bytes` (columns). generic and avx2: 6 x (2 x 32 bytes), 12
// accumulators of the 16 ymm registers; avx512: 8 x (2 x 64 bytes), 16 of the
// 32 zmm registers. Measured on Zen 4 (KITTI sweep, k=3, C=64 and 128, one
// thread): 8 and 14 rows equal, 12 slower; 8 wastes the fewest rows on the
// short runs of pairs an offset has in a row block.
#ifndef PS_CONV_AVX512_MR
#define PS_CONV_AVX512_MR 8
#endif
struct TileShape {
  int mr;
  int vec_bytes;
};
constexpr TileShape tile_shape(Isa isa) {
  return isa == Isa::avx512 ? TileShape{PS_CONV_AVX512_MR, 64} : TileShape{6, 32};
}
// Columns per register tile (two vectors) and column panels of `cols`.
template <typename T>
constexpr int64_t nr(Isa isa) { return 2 * tile_shape(isa).vec_bytes / int64_t(sizeof(T)); }
template <typename T>
constexpr int64_t panels(Isa isa, int64_t cols) { return (cols + nr<T>(isa) - 1) / nr<T>(isa); }
template <typename T>
constexpr int64_t wpack_size(Isa isa, int64_t k, int64_t kc, int64_t cols) {
  return k * panels<T>(isa, cols) * kc * nr<T>(isa);
}
template <typename T>
constexpr int64_t wgrad_scratch(Isa isa, int64_t c_in, int64_t c_out) {
  return tile_shape(isa).mr * kKC + panels<T>(isa, c_out) * nr<T>(isa) * kKC;
}

// n elements of T (not initialised) at a 64-byte boundary, in memory that
// `owner` keeps: the kernels' scratch blocks.
template <typename T>
T* aligned_scratch(std::unique_ptr<T[]>& owner, int64_t n) {
  owner.reset(new T[size_t(n + 64 / int64_t(sizeof(T)))]);  // 64 bytes of slack for the boundary
  const uintptr_t off = reinterpret_cast<uintptr_t>(owner.get()) % 64;
  return off ? reinterpret_cast<T*>(reinterpret_cast<char*>(owner.get()) + (64 - off)) : owner.get();
}

// Where the apply kernels of build `isa` stream a's output (see
// kStreamBytes: a large output whose rows are whole vectors of the build and
// start at its vector boundary, as the streaming stores need): a.blocks set
// to 64-byte aligned scratch of nt * 2 * kBlockRows * cols elements, which
// `owner` keeps; elsewhere nothing is changed. Called by the dispatch (fused.cpp,
// sparse.cpp) for the build that runs.
void attach_blocks(ApplyArgs<float>& a, Isa isa, std::unique_ptr<float[]>& owner);
void attach_blocks(ApplyArgs<double>& a, Isa isa, std::unique_ptr<double[]>& owner);

// Entry points: the build `isa` (one that runs here: isa_runs(isa)) with its
// scratch (a.wpack / a.scratch are set here).
void apply(ApplyArgs<float> a, Isa isa);
void apply(ApplyArgs<double> a, Isa isa);
void wgrad(WgradArgs<float> a, Isa isa);
void wgrad(WgradArgs<double> a, Isa isa);

// The bf16 inference forward (fused_bf16.cpp, AVX512-BF16 `vdpbf16ps`):
// dst (float32) = bias + sum over offsets of src[col] @ W_k, src and W bf16
// (raw uint16 bits), products summed in float32 in channel-pair order.
struct ApplyBf16Args {
  const uint16_t* src;  // (rows of the read side, kc)
  const uint16_t* w;    // (K, kc, cols)
  const float* bias;    // (cols) or null
  // (num_rows, cols), or null where dst_bf16 is set: the float32 sums are
  // then kept only block by block (sums), never written in full.
  float* dst;
  int64_t kc, cols, num_rows;
  PairList pairs;
  int nt;
  bool relu;
  // (num_rows, cols) or null: dst rounded to bf16 (to nearest even, NaN as
  // 0xFFFF: torch's CPU rounding) block by block while the rows are in cache.
  uint16_t* dst_bf16 = nullptr;
  // The largest density of listed vectors at which the vector-sparse form
  // runs (see Bf16Execution); negative: never.
  double vector_density = -1.0;
  // (num_rows, cols) bf16 bits or null: a residual added (widened to
  // float32) to dst before the ReLU, block by block (ApplyArgs::add).
  const uint16_t* add = nullptr;
  // Set by apply_bf16 where dst is null: a block of sums a thread, of
  // min(kBlockRows, num_rows) x cols (scratch_rows in fused_kernels.h).
  float* sums = nullptr;
  // The smallest listed width (density of listed vectors, as for
  // vector_density, x sqrt(kc x cols): the channels a pair's vector form
  // would run, in a square conv's terms) at which the AMX form
  // (Bf16Execution::tiles) runs where amx_bf16_runs(); infinite: never.
  double tiles_width = __builtin_inf();
};
// Whether this build and this CPU run apply_bf16 (AVX-512 F/VL/BW/DQ + BF16).
bool bf16_runs();

// What apply_bf16 ran. Offsets whose weight slab is all zero are skipped
// (`offsets`: some were). A bf16 vector is (offset k, channel pair q, panel
// of kBf16Panel output columns): listed where W_k[2q] or W_k[2q + 1] holds a
// nonzero in the panel's columns (`!= 0`: -0 is zero, NaN is not); density
// = listed vectors / (kept offsets x pairs x panels). Where density <=
// vector_density the vector-sparse form runs (`vector`): per tile and panel
// only the listed pairs, the same float32 sums of the same products in the
// same order as the dense form (a pair left out adds only zero products).
// `tiles` (where the CPU runs AMX-BF16, amx_bf16_runs(), and the listed
// width is at least tiles_width, see ApplyBf16Args): every
// kept offset's products by the AMX tiles, 16 pairs x 16 columns a tile:
// per tile the gathered rows' channel pairs (zero past kc) times the
// offset's weight, summed in float32 from zero in channel-pair order by
// `tdpbf16ps`, then added to the row (or to bias / zero on a block's first
// offset). Other sums than the vdpbf16ps forms' (those add each product to
// the row's running sum), within float32 rounding of the same exact sum,
// and as those the same for any thread count.
enum class Bf16Execution { dense = 0, offsets = 1, vector = 2, tiles = 3 };
// Columns of a bf16 vector: the float32 vector kernels' panel (16), so that
// one pruning mask (prune.panel_structured) serves both.
constexpr int64_t kBf16Panel = 16;
// Whether this build and this CPU run the `tiles` form (AMX-TILE + AMX-BF16
// and the OS's leave: amx_bf16_runs()).
bool bf16_tiles_run();
// Precondition: bf16_runs().
Bf16Execution apply_bf16(const ApplyBf16Args& a);

// Each build's kernels; their scratch must be set.
#define PS_CONV_DECLARE_KERNELS         \
  void apply(const ApplyArgs<float>& a);  \
  void apply(const ApplyArgs<double>& a); \
  void wgrad(const WgradArgs<float>& a);  \
  void wgrad(const WgradArgs<double>& a);
namespace avx512 { PS_CONV_DECLARE_KERNELS }
namespace avx2 { PS_CONV_DECLARE_KERNELS }
namespace generic { PS_CONV_DECLARE_KERNELS }
#undef PS_CONV_DECLARE_KERNELS

}  // namespace conv
}  // namespace ps
