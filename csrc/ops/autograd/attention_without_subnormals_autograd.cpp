// Autograd of _attention_without_subnormals, registered at the Autograd key:
// on the CPU, SDPA's flash kernel forward and its backward with subnormal
// numbers flushed to 0 (_attention_without_subnormals_backward); elsewhere,
// and where SDPA would not choose that kernel, SDPA with its own autograd.

#include "ops/attention_without_subnormals.h"
#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"

#include <ATen/ATen.h>
#include <ATen/SDPBackend.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace attnpool {
namespace {

class AttentionWithoutSubnormalsFunction
    : public torch::autograd::Function<AttentionWithoutSubnormalsFunction> {
 public:
  // attn_mask gets no gradient (the autograd kernel sends a mask that needs
  // one to SDPA).
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& query,
      const at::Tensor& key,
      const at::Tensor& value,
      const std::optional<at::Tensor>& attn_mask,
      double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, logsumexp] = at::_scaled_dot_product_flash_attention_for_cpu(
        query, key, value, /*dropout_p=*/0.0, /*is_causal=*/false, attn_mask, scale);
    ctx->save_for_backward({query, key, value, out, logsumexp});
    if (attn_mask.has_value()) {
      ctx->saved_data["attn_mask"] = *attn_mask;
    }
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = ctx->saved_data.find("attn_mask");
    auto [grad_query, grad_key, grad_value] = detail::attention_without_subnormals_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        saved[2],
        saved[3],
        saved[4],
        mask == ctx->saved_data.end() ? std::nullopt
                                      : std::optional<at::Tensor>(mask->second.toTensor()),
        ctx->saved_data["scale"].toDouble());
    return {grad_query, grad_key, grad_value, at::Tensor(), at::Tensor()};
  }
};

// Whether the CPU's flushed backward serves this call: SDPA would run its
// CPU flash kernel (the one whose backward the CPU kernel flushes), and
// only query, key and value need gradients. float64 keeps SDPA's own
// autograd: its weights go subnormal only at scores some 700 apart.
bool flushed_backward_serves(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  if (!query.is_cpu() || query.scalar_type() == at::kDouble ||
      (attn_mask.has_value() && attn_mask->requires_grad())) {
    return false;
  }
  const auto backend = static_cast<at::SDPBackend>(at::_fused_sdp_choice(
      query, key, value, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale));
  return backend == at::SDPBackend::flash_attention;
}

at::Tensor attention_without_subnormals_autograd(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  detail::check_attention_without_subnormals_args(query, key, value, attn_mask);
  const bool needs_grad = detail::any_needs_grad({&query, &key, &value}, {&attn_mask});
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return detail::attention_without_subnormals(query, key, value, attn_mask, scale);
  }
  // SDPA has no forward-mode AD: a tangent gets its error.
  if (detail::any_tangent({&query, &key, &value}, attn_mask) ||
      !flushed_backward_serves(query, key, value, attn_mask, scale)) {
    return at::scaled_dot_product_attention(
        query, key, value, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
  }
  return AttentionWithoutSubnormalsFunction::apply(query, key, value, attn_mask, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("_attention_without_subnormals", &attention_without_subnormals_autograd);
  m.impl(
      "_attention_without_subnormals_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
