#pragma once

// Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad dual
// tensors). A C++ torch::autograd::Function has no jvp, so the formula lives
// in the Python package (attnpool/_transforms.py), which registers it as the
// kernel of a private operator, e.g. attnpool::_folded_attention_pool_forward_ad.
// The C++ autograd kernels send calls with a tangent there. A C++ program
// without the Python package gets a clear error instead of a dropped tangent
// (a zero Jacobian, silently).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace attnpool::detail {

inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

inline bool any_tangent(
    std::initializer_list<const at::Tensor*> inputs,
    const std::optional<at::Tensor>& optional_input = std::nullopt) {
  bool tangent = optional_input.has_value() && has_tangent(*optional_input);
  for (const at::Tensor* t : inputs) {
    tangent = tangent || has_tangent(*t);
  }
  return tangent;
}

// The operator attnpool::_<op>_forward_ad, typed as Signature, once the
// Python package has given it a kernel.
template <typename Signature>
c10::TypedOperatorHandle<Signature> forward_ad_operator(const char* op) {
  const std::string name = std::string("attnpool::_") + op + "_forward_ad";
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  TORCH_CHECK_NOT_IMPLEMENTED(
      handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd),
      "attnpool::",
      op,
      ": forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad dual tensors) is "
      "implemented in the Python package; import attnpool first, or use reverse mode "
      "(backward, torch.autograd.grad)");
  return handle.typed<Signature>();
}

}  // namespace attnpool::detail
