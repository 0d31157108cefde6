#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace attnpool {

// Attention pooling of a batch of sequences with a learned query (SPEC.md §1).
//
//   x:     [B, L, H]  float64, float32, float16 or bfloat16, any strides
//   query: [H] or [Q, H]
//   w_q:   [H, H]     nn.Linear layout (out, in)
//   w_k:   [H, H]     nn.Linear layout (out, in)
//   mask:  [B, L]     optional; nonzero (or true) means "attend"
//
// Returns [B, H] for a 1-D query and [B, Q, H] otherwise, in x's dtype.
// Calls the `attnpool::attention_pool` operator through the dispatcher, so it
// is differentiable with respect to x, query, w_q and w_k from C++ as well.
at::Tensor attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask = std::nullopt,
    int64_t num_heads = 1,
    std::optional<double> scale = std::nullopt);

// The CPU instruction set the CPU kernels run with in this process
// ("AVX512", "AVX2" or "DEFAULT"), chosen once at run time from the CPU and
// the ATEN_CPU_CAPABILITY environment variable.
const char* cpu_kernel_isa();

}  // namespace attnpool
