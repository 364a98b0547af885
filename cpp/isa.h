// The instruction sets the per-ISA kernel builds (conv/fused_*.cpp,
// spmm/isa_*.cpp) are compiled for, and the one cached check of which of them
// this build and this CPU can run. Conv and SpMM dispatch on the same answer.
#pragma once

#include <string>

namespace ps {

// Ordered: a later one runs wherever it runs, and is preferred there.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };
constexpr int kNumIsas = 3;

const char* isa_name(Isa isa);
// Whether this build holds `isa`'s kernels and the CPU runs them (asked once).
bool isa_runs(Isa isa);
// The widest instruction set that runs here, or set_isa_limit's narrower one:
// what dispatch picks by default (an `isa` argument of None).
Isa best_isa();
// The widest instruction set that runs here, whatever the limit.
Isa detected_best_isa();
// Caps best_isa() at `limit` (0 generic, 1 avx2, 2 avx512; -1: no cap),
// process-wide; under avx512 the bf16 kernels and AMX tiles are off too
// (avx512_bf16_runs, amx_bf16_runs) and avx512_full_width() answers false:
// the engine then runs as on a CPU without AVX-512 (an AMD Zen 3's defaults on
// an AVX-512 machine, for tests and benchmarks). An `isa` named in a call
// still runs any build the CPU runs. pointsparse reads POINTSPARSE_ISA at
// import.
void set_isa_limit(int limit);
// set_isa_limit's value (-1: none).
int isa_limit();
// Whether the CPU runs AVX512-BF16 on top of the avx512 build (asked once;
// the bf16 conv kernels' build is the caller's to know), and no limit keeps
// best_isa() below avx512.
bool avx512_bf16_runs();
// Whether the avx512 build runs here on a CPU whose AVX-512 cores execute
// 512-bit FMAs at full width: Intel's, AMD's from Zen 5 (family 0x1A, not
// its laptop parts); AMD Zen 4 runs each as two 256-bit halves. There the
// dense AVX-512 kernels gain most over the 32-byte builds. The CPU is asked
// once; set_avx512_full_width overrides the answer (process-wide).
bool avx512_full_width();
// What the CPU answers, whatever the override.
bool avx512_full_width_detected();
// 1 or 0: avx512_full_width() answers that (false where the avx512 build
// does not run); -1: the CPU's answer again. For tests and benchmarks
// (pointsparse reads POINTSPARSE_AVX512_FULL_WIDTH at import).
void set_avx512_full_width(int value);
// Whether the vector-sparse and bf16 walks fetch the thread's next block's
// opening rows into L2 during this block (apply_blocks' kNext, fused_kernels.h):
// on Intel CPUs, where it took 5-6% off (an Intel Xeon), not on AMD's, where it
// added 4-10% (an AMD EPYC Zen 5; bench/RESULTS.md stops 61 and 70). Asked
// once; set_next_block_fetch overrides it (process-wide).
bool next_block_fetch();
// 1 or 0: next_block_fetch() answers that; -1: the CPU's answer again. For
// tests and benchmarks.
void set_next_block_fetch(int value);
// Whether the CPU runs AMX-TILE and AMX-BF16 on top of that, and the OS lets
// this process use the tiles (asked once, on the first call).
bool amx_bf16_runs();
// The builds that run here, widest first, e.g. "avx512, avx2, generic".
std::string runnable_isas();
// `name` ("generic", "avx2", "avx512"; "" for best_isa()) as an Isa that runs
// here; ValueError naming `arg` for an unknown name or one this CPU cannot run.
Isa isa_from_name(const std::string& name, const char* arg);

}  // namespace ps
