// Autograd of _layer_norm_folded_attention_pool, registered at the Autograd
// key as folded_attention_pool's is: the forward saves x, the norm's
// parameters, the output and the log-sum-exp; the backward is one more pass
// over x. Forward-mode AD runs the composition (the norm, then
// folded_attention_pool), whose parts have their own.

#include "ops/autograd/attn_bias.h"
#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/folded_attention_pool.h"

#include <attnpool/attention_pool.h>

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>

namespace attnpool {
namespace {

constexpr const char* kOp = "_layer_norm_folded_attention_pool";

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class LayerNormPoolFunction : public torch::autograd::Function<LayerNormPoolFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& u,
      const std::optional<at::Tensor>& norm_weight,
      const std::optional<at::Tensor>& norm_bias,
      double norm_eps,
      const std::optional<at::Tensor>& mask,
      double scale,
      bool full_width,
      const std::optional<at::Tensor>& attn_bias,
      const std::optional<at::Tensor>& lengths) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = detail::call_layer_norm_pool_forward(
        x, u, norm_weight, norm_bias, norm_eps, mask, scale, full_width, attn_bias, lengths);
    ctx->save_for_backward(
        {x,
         u,
         norm_weight.value_or(at::Tensor()),
         norm_bias.value_or(at::Tensor()),
         mask.value_or(at::Tensor()),
         out,
         lse,
         attn_bias.value_or(at::Tensor()),
         lengths.value_or(at::Tensor())});
    ctx->saved_data["norm_eps"] = norm_eps;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["full_width"] = full_width;
    return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
  }

  // As folded_attention_pool's: create_graph=True works, a second derivative
  // raises "derivative ... not implemented".
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, du, dweight, dbias] = detail::call_layer_norm_pool_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        optional(saved[2]),
        optional(saved[3]),
        ctx->saved_data["norm_eps"].toDouble(),
        optional(saved[4]),
        saved[5],
        saved[6],
        ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["full_width"].toBool(),
        optional(saved[7]),
        optional(saved[8]));
    return {
        dx,
        du,
        saved[2].defined() ? dweight : at::Tensor(),
        saved[3].defined() ? dbias : at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor()};
  }
};

at::Tensor layer_norm_pool_autograd(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::refuse_attn_bias_gradient(kOp, attn_bias);
  const auto tangent = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && detail::has_tangent(*t);
  };
  if (detail::any_tangent({&x, &u}, attn_bias) || tangent(norm_weight) || tangent(norm_bias)) {
    return folded_attention_pool(
        detail::layer_norm_rows(x, norm_weight, norm_bias, norm_eps),
        u,
        mask,
        scale,
        full_width,
        attn_bias,
        lengths);
  }
  const bool needs_grad = detail::any_needs_grad({&x, &u}, {&norm_weight, &norm_bias});
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("attnpool::_layer_norm_folded_attention_pool", "")
                               .typed<decltype(layer_norm_pool_autograd)>();
    return op.call(
        x, u, norm_weight, norm_bias, norm_eps, mask, scale, full_width, attn_bias, lengths);
  }
  return LayerNormPoolFunction::apply(
      x, u, norm_weight, norm_bias, norm_eps, mask, scale, full_width, attn_bias, lengths);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("_layer_norm_folded_attention_pool", &layer_norm_pool_autograd);
  m.impl(
      "_layer_norm_folded_attention_pool_forward",
      torch::autograd::autogradNotImplementedFallback());
  m.impl(
      "_layer_norm_folded_attention_pool_backward",
      torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
