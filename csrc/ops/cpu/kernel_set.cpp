// The registry of the per-instruction-set CPU kernels and the choice among
// them: the best that the CPU (and ATEN_CPU_CAPABILITY, then
// ATTNPOOL_CPU_CAPABILITY) allows.

#include "ops/cpu/kernel_set.h"

#include <attnpool/attention_pool.h>

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace attnpool::cpu {
namespace {

std::vector<KernelSet>& kernel_registry() {
  static std::vector<KernelSet> registry;
  return registry;
}

constexpr std::array<std::pair<const char*, Isa>, 5> kIsaNames = {{
    {"DEFAULT", Isa::DEFAULT},
    {"AVX2", Isa::AVX2},
    {"AVX512", Isa::AVX512},
    {"AVX512_BF16", Isa::AVX512_BF16},
    {"AMX_BF16", Isa::AMX_BF16},
}};

// Whether the CPU (and the OS) can run AVX512-BF16, which ATen's capability
// levels do not tell apart from AVX-512.
bool has_avx512_bf16() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Whether the CPU has AMX-BF16 and Linux lets this process use the tile
// registers: their state is large, so Linux hands it only to a process that
// asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process; a
// kernel older than 5.16 refuses, and the kernels then stay below AMX).
bool has_amx_bf16() {
#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) {
    return false;
  }
  constexpr unsigned int kAmxBf16 = 1u << 22;
  constexpr unsigned int kAmxTile = 1u << 24;
  if ((edx & kAmxBf16) == 0 || (edx & kAmxTile) == 0) {
    return false;
  }
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

// The instruction set ATen itself runs with (the CPU's best, lowered by the
// ATEN_CPU_CAPABILITY environment variable), raised to AVX512_BF16 or
// AMX_BF16 where the CPU has them.
Isa aten_capability() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    if (!has_avx512_bf16()) {
      return Isa::AVX512;
    }
    return has_amx_bf16() ? Isa::AMX_BF16 : Isa::AVX512_BF16;
  }
  if (capability == "AVX2") {
    return Isa::AVX2;
  }
  return Isa::DEFAULT;
}

// aten_capability(), lowered by ATTNPOOL_CPU_CAPABILITY (default, avx2,
// avx512, avx512_bf16 or amx_bf16, any case): attnpool's own knob, since
// ATen's variable has no levels above AVX-512. It never raises the level
// above what the CPU has.
Isa cpu_capability() {
  const Isa best = aten_capability();
  const char* requested = std::getenv("ATTNPOOL_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') {
    return best;
  }
  std::string name(requested);
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) {
    return static_cast<char>(std::toupper(c));
  });
  for (const auto& [known, isa] : kIsaNames) {
    if (name == known) {
      return std::min(isa, best);
    }
  }
  TORCH_CHECK(
      false,
      "attnpool: ATTNPOOL_CPU_CAPABILITY must be one of default, avx2, avx512, avx512_bf16, "
      "amx_bf16; got '",
      requested,
      "'");
}

const KernelSet& choose_kernels() {
  const Isa limit = cpu_capability();
  const KernelSet* best = nullptr;
  for (const auto& kernels : kernel_registry()) {
    if (kernels.isa <= limit && (best == nullptr || kernels.isa > best->isa)) {
      best = &kernels;
    }
  }
  TORCH_CHECK(best != nullptr, "attnpool: no CPU kernels were built into this library");
  return *best;
}

}  // namespace

bool register_kernels(const KernelSet& kernels) {
  kernel_registry().push_back(kernels);
  return true;
}

const KernelSet& selected_kernels() {
  static const KernelSet& chosen = choose_kernels();
  return chosen;
}

}  // namespace attnpool::cpu

namespace attnpool {

const char* cpu_kernel_isa() {
  return cpu::selected_kernels().name;
}

}  // namespace attnpool
