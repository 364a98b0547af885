// Run-time detection of the instruction sets (see isa.h): asked of the CPU
// once, on first use.
#include "isa.h"

#include "common.h"

#include <atomic>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ps {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define PS_ISA_X86 1
#endif

// avx2: AVX2 + FMA. avx512: F (the zmm registers, masks), VL, BW and DQ
// (the pragma of the avx512 builds) + FMA.
bool cpu_has(Isa isa) {
#if defined(PS_ISA_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case Isa::generic: return true;
    case Isa::avx2: return avx2;
    case Isa::avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::generic;
#endif
}

bool cpu_has_bf16() {
#if defined(PS_ISA_X86)
  __builtin_cpu_init();
  return cpu_has(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX tiles with AMX-BF16 on top of AVX512-BF16, and the kernel's leave to
// use the tile data (Linux 5.16+: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), asked once for the whole process, on the first
// question about the tiles only: once granted, the kernel refuses an
// alternate signal stack too small for the tiles' state; a kernel that
// refuses it, or another OS, leaves the tiles off).
bool cpu_has_amx() {
#if defined(PS_ISA_X86) && defined(__linux__) && defined(SYS_arch_prctl) && __GNUC__ >= 11
  __builtin_cpu_init();
  if (!cpu_has_bf16() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

struct Support {
  bool runs[kNumIsas];
  bool bf16;
  Support() : bf16(cpu_has_bf16()) {
    for (int i = 0; i < kNumIsas; ++i) runs[i] = cpu_has(Isa(i));
  }
};

const Support& support() {
  static const Support s;
  return s;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "generic";
  }
}

bool isa_runs(Isa isa) { return support().runs[int(isa)]; }

bool avx512_bf16_runs() { return support().bf16 && best_isa() == Isa::avx512; }

namespace {

// AMD's family and model (CPUID leaf 1, extended fields added), or -1, -1.
std::pair<int, int> amd_family_model() {
#if defined(PS_ISA_X86)
  if (!__builtin_cpu_is("amd")) return {-1, -1};
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return {-1, -1};
  const int base = int((eax >> 8) & 0xf);
  const int family = base == 0xf ? base + int((eax >> 20) & 0xff) : base;
  const int model = int((eax >> 4) & 0xf) | (base == 0xf ? int((eax >> 16) & 0xf) << 4 : 0);
  return {family, model};
#else
  return {-1, -1};
#endif
}

// Whether this CPU's AVX-512 FMAs run at full width: Intel's; AMD's from
// Zen 5 (family 0x1A) but its laptop parts (models 0x20-0x2F, 0x60-0x6F:
// Strix and Krackan Point, whose cores split them in 256-bit halves, as
// every Zen 4 does). Measured on an AMD EPYC family 26 model 2: its avx512
// dense conv 1.7x the avx2 one (bench/RESULTS.md stop 50).
bool cpu_full_width() {
#if defined(PS_ISA_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return true;
  const auto fm = amd_family_model();
  if (fm.first < 0x1a) return false;
  const int model = fm.second;
  return fm.first > 0x1a || !((model >= 0x20 && model <= 0x2f) || (model >= 0x60 && model <= 0x6f));
#else
  return false;
#endif
}

// -1: the CPU's answer; 0 or 1: set_avx512_full_width's.
std::atomic<int> g_full_width_set{-1};

bool cpu_is_intel() {
#if defined(PS_ISA_X86)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// -1: the CPU's answer; 0 or 1: set_next_block_fetch's.
std::atomic<int> g_next_fetch_set{-1};

// -1: no cap; else set_isa_limit's Isa as an int.
std::atomic<int> g_isa_limit{-1};

}  // namespace

bool avx512_full_width_detected() {  // (the CPU's answer: no cap, no override)
  static const bool wide = isa_runs(Isa::avx512) && cpu_full_width();
  return wide;
}

bool avx512_full_width() {
  if (best_isa() != Isa::avx512) return false;  // (capped below it: set_isa_limit)
  const int set = g_full_width_set.load(std::memory_order_relaxed);
  return set >= 0 ? set == 1 : avx512_full_width_detected();  // (best_isa() avx512: the build runs)
}

void set_avx512_full_width(int value) { g_full_width_set.store(value < 0 ? -1 : value ? 1 : 0); }

bool next_block_fetch() {
  static const bool intel = cpu_is_intel();
  const int set = g_next_fetch_set.load(std::memory_order_relaxed);
  return set >= 0 ? set == 1 : intel;
}

void set_next_block_fetch(int value) { g_next_fetch_set.store(value < 0 ? -1 : value ? 1 : 0); }

bool amx_bf16_runs() {
  static const bool amx = cpu_has_amx();
  return amx && best_isa() == Isa::avx512;  // (capped below avx512: set_isa_limit)
}

Isa detected_best_isa() {
  static const Isa best = [] {
    for (int i = kNumIsas - 1; i > 0; --i)
      if (isa_runs(Isa(i))) return Isa(i);
    return Isa::generic;
  }();
  return best;
}

Isa best_isa() {
  const Isa best = detected_best_isa();
  const int limit = g_isa_limit.load(std::memory_order_relaxed);
  return limit >= 0 && limit < int(best) ? Isa(limit) : best;
}

void set_isa_limit(int limit) { g_isa_limit.store(limit < 0 ? -1 : limit < kNumIsas ? limit : -1); }

int isa_limit() { return g_isa_limit.load(std::memory_order_relaxed); }

std::string runnable_isas() {
  std::string s;
  for (int i = kNumIsas - 1; i >= 0; --i)
    if (isa_runs(Isa(i))) s += std::string(s.empty() ? "" : ", ") + isa_name(Isa(i));
  return s;
}

Isa isa_from_name(const std::string& name, const char* arg) {
  if (name.empty()) return best_isa();
  for (int i = 0; i < kNumIsas; ++i) {
    if (name != isa_name(Isa(i))) continue;
    if (!isa_runs(Isa(i)))
      value_error(std::string(arg) + " = '" + name + "' does not run on this CPU (or this build); it runs: " +
                  runnable_isas());
    return Isa(i);
  }
  value_error(std::string(arg) + " must be one of 'generic', 'avx2', 'avx512' (or None: the best that runs); got '" +
              name + "'");
}

}  // namespace ps
