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
// The widest instruction set that runs here: what dispatch picks by default.
Isa best_isa();
// Whether the CPU runs AVX512-BF16 on top of the avx512 build (asked once;
// the bf16 conv kernels' build is the caller's to know).
bool avx512_bf16_runs();
// Whether the avx512 build runs here on an Intel CPU, whose AVX-512 cores
// execute 512-bit FMAs at full width (AMD Zen 4 runs each as two 256-bit
// halves): there the dense AVX-512 kernels gain most over the 32-byte builds
// (asked once).
bool avx512_full_width();
// Whether the CPU runs AMX-TILE and AMX-BF16 on top of that, and the OS lets
// this process use the tiles (asked once, on the first call).
bool amx_bf16_runs();
// The builds that run here, widest first, e.g. "avx512, avx2, generic".
std::string runnable_isas();
// `name` ("generic", "avx2", "avx512"; "" for best_isa()) as an Isa that runs
// here; ValueError naming `arg` for an unknown name or one this CPU cannot run.
Isa isa_from_name(const std::string& name, const char* arg);

}  // namespace ps
