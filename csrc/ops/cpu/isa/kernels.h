#pragma once

// The CPU kernels of one instruction set: dispatch on the dtype and register
// the set (ops/cpu/kernel_set.h). Included once by each
// isa/kernels_<isa>.cpp, which defines CPU_CAPABILITY (and
// CPU_CAPABILITY_<ISA>) first so that at::vec::Vectorized picks that
// instruction set, as ATen's own kernels do.

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including ops/cpu/isa/kernels.h"
#endif

#include "ops/cpu/isa/backward.h"
#include "ops/cpu/isa/fold.h"
#include "ops/cpu/isa/forward.h"
#include "ops/cpu/isa/jvp.h"
#include "ops/cpu/isa/softmax.h"
#include "ops/cpu/kernel_set.h"

#include <ATen/Dispatch.h>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

void forward(const ForwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "attnpool_forward", [&] { forward_impl<scalar_t>(p); });
}

void backward(const BackwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attnpool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradDotsBf16 dots = grad_dots_in_bf16<scalar_t, acc_t>(p);
    compute_delta<acc_t>(p, dots, static_cast<acc_t*>(p.delta));
    backward_impl<scalar_t>(p, dots);
  });
}

void jvp(const JvpParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "attnpool_jvp", [&] { jvp_impl<scalar_t>(p); });
}

void fold(const FoldParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "attnpool_fold", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (p.weights == FoldWeights::kBFloat16) {
        return fold_impl<at::BFloat16, float>(p);
      }
      if (p.weights == FoldWeights::kHalf) {
        return fold_impl<at::Half, float>(p);
      }
    }
    fold_impl<scalar_t, scalar_t>(p);
  });
}

void fold_backward(const FoldBackwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(
      dtype, "attnpool_fold_backward", [&] { fold_backward_impl<scalar_t>(p); });
}

void softmax(const SoftmaxParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "attnpool_softmax", [&] { softmax_impl<scalar_t>(p); });
}

#define ATTNPOOL_STRINGIFY_(x) #x
#define ATTNPOOL_STRINGIFY(x) ATTNPOOL_STRINGIFY_(x)

// This file's static initializer runs on every CPU, also one without this
// instruction set: it must not build the set on the stack. Under
// AddressSanitizer the stack's shadow bytes were then poisoned with AVX-512
// stores (vmovdqu8), which killed the library's loading on an AVX2-only CPU.
// A constant-initialized set leaves the initializer one call.
constexpr KernelSet kKernels{
    Isa::CPU_CAPABILITY,
    ATTNPOOL_STRINGIFY(CPU_CAPABILITY),
    &forward,
    &backward,
    &jvp,
    &fold,
    &fold_backward,
    &softmax};

[[maybe_unused]] const bool registered = register_kernels(kKernels);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
