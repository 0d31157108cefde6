#pragma once

// Whether a call is recorded for the backward: grad mode is on and some
// input requires grad. The autograd kernels run the plain kernel below
// autograd otherwise (nothing saved); the projection path keeps float32
// scores for the gradients it then owes.

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>
#include <optional>

namespace attnpool::detail {

inline bool any_needs_grad(
    std::initializer_list<const at::Tensor*> inputs,
    std::initializer_list<const std::optional<at::Tensor>*> optional_inputs = {}) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const at::Tensor* t : inputs) {
    if (t->requires_grad()) {
      return true;
    }
  }
  for (const std::optional<at::Tensor>* t : optional_inputs) {
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) {
      return true;
    }
  }
  return false;
}

}  // namespace attnpool::detail
