#pragma once

// attn_bias is an additive mask: the kernels compute no gradient for it, so
// asking for one in reverse mode is an error, not a silent None. (Forward mode
// covers it: the Python package's jvp adds its tangent to the scores'.)

#include "ops/autograd/grad_mode.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace attnpool::detail {

inline void refuse_attn_bias_gradient(const char* op, const std::optional<at::Tensor>& attn_bias) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !any_needs_grad({}, {&attn_bias}),
      "attnpool::",
      op,
      ": attn_bias has no gradient in reverse mode (it is an additive mask); pass "
      "attn_bias.detach()");
}

}  // namespace attnpool::detail
