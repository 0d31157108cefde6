// Autograd of _softmax_without_subnormals, registered at the Autograd key:
// the softmax's own backward from the saved weights, where a weight set to 0
// gives its score a gradient of exactly 0 (never a subnormal one).

#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/softmax_without_subnormals.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace attnpool {
namespace {

class SoftmaxWithoutSubnormalsFunction
    : public torch::autograd::Function<SoftmaxWithoutSubnormalsFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& scores) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto weights = detail::softmax_without_subnormals(scores);
    ctx->save_for_backward({weights});
    return weights;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto weights = ctx->get_saved_variables()[0];
    return {at::_softmax_backward_data(grad_outputs[0], weights, -1, weights.scalar_type())};
  }
};

at::Tensor softmax_without_subnormals_autograd(const at::Tensor& scores) {
  // A tangent goes through ATen's ops, which have forward-mode AD.
  if (detail::has_tangent(scores)) {
    return detail::softmax_without_subnormals_by_aten(scores);
  }
  if (!detail::any_needs_grad({&scores})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return detail::softmax_without_subnormals(scores);
  }
  return SoftmaxWithoutSubnormalsFunction::apply(scores);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("_softmax_without_subnormals", &softmax_without_subnormals_autograd);
}

}  // namespace attnpool
