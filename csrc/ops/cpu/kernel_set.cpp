// The registry of the per-instruction-set CPU kernels and the choice among
// them: the best that the CPU (and ATEN_CPU_CAPABILITY) allows.

#include "ops/cpu/kernel_set.h"

#include <attnpool/attention_pool.h>

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace attnpool::cpu {
namespace {

std::vector<KernelSet>& kernel_registry() {
  static std::vector<KernelSet> registry;
  return registry;
}

// The instruction set ATen itself runs with: the CPU's best, lowered by the
// ATEN_CPU_CAPABILITY environment variable.
Isa cpu_capability() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return Isa::AVX512;
  }
  if (capability == "AVX2") {
    return Isa::AVX2;
  }
  return Isa::DEFAULT;
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
