#pragma once

// Forward-mode AD (torch.func.jvp, jacfwd, dual tensors) has no formula in
// these ops yet. Without this check an input's tangent would be dropped and
// the output would get none: a zero Jacobian, silently.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>

namespace attnpool::detail {

inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

inline void refuse_forward_ad(
    const char* op,
    std::initializer_list<const at::Tensor*> inputs,
    const std::optional<at::Tensor>& optional_input = std::nullopt) {
  bool tangent = optional_input.has_value() && has_tangent(*optional_input);
  for (const at::Tensor* t : inputs) {
    tangent = tangent || has_tangent(*t);
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      !tangent,
      "attnpool::",
      op,
      ": forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad dual tensors) is "
      "not implemented; use reverse mode (backward, torch.autograd.grad, torch.func.vjp)");
}

}  // namespace attnpool::detail
