// Autograd of folded_attention_pool, registered at the Autograd key so that
// gradients work from Python and from C++ alike. The forward saves the
// log-sum-exp; the backward is one more pass over x (SPEC.md §5).

#include <attnpool/attention_pool.h>

#include "ops/autograd/attn_bias.h"
#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/folded_attention_pool.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace attnpool {
namespace {

class FoldedAttentionPoolFunction : public torch::autograd::Function<FoldedAttentionPoolFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& u,
      const std::optional<at::Tensor>& mask,
      double scale,
      bool full_width,
      const std::optional<at::Tensor>& attn_bias,
      const std::optional<at::Tensor>& lengths) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The backward gets the unrounded (accumulation dtype) output.
    auto [out, lse] = detail::call_folded_attention_pool_forward(
        x, u, mask, scale, full_width, attn_bias, lengths);
    ctx->save_for_backward(
        {x,
         u,
         mask.value_or(at::Tensor()),
         out,
         lse,
         attn_bias.value_or(at::Tensor()),
         lengths.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["full_width"] = full_width;
    // (Not out.to(...) when the dtypes agree: that would return its input,
    // which an op below autograd must not do.)
    return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
  }

  // The backward op itself has no derivative: create_graph=True works, but
  // differentiating these gradients raises "derivative ... not implemented".
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    auto [dx, du] = detail::call_folded_attention_pool_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        optional(saved[2]),
        saved[3],
        saved[4],
        ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["full_width"].toBool(),
        optional(saved[5]),
        optional(saved[6]));
    return {dx, du, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor folded_attention_pool_autograd(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::refuse_attn_bias_gradient("folded_attention_pool", attn_bias);
  if (detail::any_tangent({&x, &u}, attn_bias)) {
    return detail::forward_ad_operator<decltype(folded_attention_pool_autograd)>(
               "folded_attention_pool")
        .call(x, u, mask, scale, full_width, attn_bias, lengths);
  }
  const bool needs_grad = detail::any_needs_grad({&x, &u});
  if (!needs_grad) {
    // Inference: the plain kernel, nothing saved.
    at::AutoDispatchBelowADInplaceOrView guard;
    return attnpool::folded_attention_pool(x, u, mask, scale, full_width, attn_bias, lengths);
  }
  return FoldedAttentionPoolFunction::apply(x, u, mask, scale, full_width, attn_bias, lengths);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("folded_attention_pool", &folded_attention_pool_autograd);
  m.impl("_folded_attention_pool_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_folded_attention_pool_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_folded_attention_pool_jvp", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
