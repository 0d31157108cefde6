// Autograd of fold_query, registered at the Autograd key. The forward saves
// projected = w_q @ query + q_bias, so the backward multiplies and never
// folds again.

#include <attnpool/attention_pool.h>

#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/fold_query.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace attnpool {
namespace {

class FoldQueryFunction : public torch::autograd::Function<FoldQueryFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& query,
      const at::Tensor& w_q,
      const at::Tensor& w_k,
      int64_t num_heads,
      const std::optional<at::Tensor>& q_bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [u, projected] = detail::call_fold_query_forward(query, w_q, w_k, num_heads, q_bias);
    ctx->save_for_backward({query, w_q, w_k, projected});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["has_bias"] = q_bias.has_value() && q_bias->defined();
    return u;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [d_query, d_w_q, d_w_k, d_q_bias] = detail::call_fold_query_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        saved[2],
        saved[3],
        ctx->saved_data["num_heads"].toInt());
    // An absent q_bias is no input to differentiate.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {d_query, d_w_q, d_w_k, at::Tensor(), has_bias ? d_q_bias : at::Tensor()};
  }
};

at::Tensor fold_query_autograd(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  if (detail::any_tangent({&query, &w_q, &w_k}, q_bias)) {
    return detail::forward_ad_operator<decltype(fold_query_autograd)>("fold_query")
        .call(query, w_q, w_k, num_heads, q_bias);
  }
  const bool needs_grad = detail::any_needs_grad({&query, &w_q, &w_k}, {&q_bias});
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attnpool::fold_query(query, w_q, w_k, num_heads, q_bias);
  }
  return FoldQueryFunction::apply(query, w_q, w_k, num_heads, q_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("fold_query", &fold_query_autograd);
  m.impl("_fold_query_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_fold_query_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
