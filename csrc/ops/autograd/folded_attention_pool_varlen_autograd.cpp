// Autograd of folded_attention_pool_varlen, registered at the Autograd key
// so that gradients work from Python and from C++ alike: as for the dense op,
// the forward saves the log-sum-exp and the backward is one more pass over x.
// Inputs with a tangent go to the Python package's jvp, as the dense op's do.

#include <attnpool/attention_pool.h>

#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/folded_attention_pool.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace attnpool {
namespace {

class FoldedAttentionPoolVarlenFunction
    : public torch::autograd::Function<FoldedAttentionPoolVarlenFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& cu_seqlens,
      const at::Tensor& u,
      double scale,
      bool full_width) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] =
        detail::call_folded_attention_pool_varlen_forward(x, cu_seqlens, u, scale, full_width);
    ctx->save_for_backward({x, cu_seqlens, u, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["full_width"] = full_width;
    return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, du] = detail::call_folded_attention_pool_varlen_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        saved[2],
        saved[3],
        saved[4],
        ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["full_width"].toBool());
    return {dx, at::Tensor(), du, at::Tensor(), at::Tensor()};
  }
};

at::Tensor folded_attention_pool_varlen_autograd(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  if (detail::any_tangent({&x, &u})) {
    return detail::forward_ad_operator<decltype(folded_attention_pool_varlen_autograd)>(
               "folded_attention_pool_varlen")
        .call(x, cu_seqlens, u, scale, full_width);
  }
  const bool needs_grad = detail::any_needs_grad({&x, &u});
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attnpool::folded_attention_pool_varlen(x, cu_seqlens, u, scale, full_width);
  }
  return FoldedAttentionPoolVarlenFunction::apply(x, cu_seqlens, u, scale, full_width);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("folded_attention_pool_varlen", &folded_attention_pool_varlen_autograd);
  m.impl(
      "_folded_attention_pool_varlen_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl(
      "_folded_attention_pool_varlen_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_folded_attention_pool_varlen_jvp", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
