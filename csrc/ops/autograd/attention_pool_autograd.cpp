// Autograd of attention_pool, registered at the Autograd key so that
// gradients work from Python and from C++ alike. The forward saves the
// log-sum-exp; the backward is one more pass over x (SPEC.md §1).

#include <attnpool/attention_pool.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace attnpool {
namespace {

std::tuple<at::Tensor, at::Tensor> call_forward(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_attention_pool_forward", "")
                             .typed<decltype(call_forward)>();
  return op.call(x, query, w_q, w_k, mask, num_heads, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads,
    std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_attention_pool_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_out, x, query, w_q, w_k, mask, out, lse, num_heads, scale);
}

class AttentionPoolFunction : public torch::autograd::Function<AttentionPoolFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& query,
      const at::Tensor& w_q,
      const at::Tensor& w_k,
      const std::optional<at::Tensor>& mask,
      int64_t num_heads,
      std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The backward gets the unrounded (accumulation dtype) output.
    auto [out, lse] = call_forward(x, query, w_q, w_k, mask, num_heads, scale);
    ctx->save_for_backward({x, query, w_q, w_k, mask.value_or(at::Tensor()), out, lse});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["scale"] = scale;
    // (Not out.to(...) when the dtypes agree: that would return its input,
    // which an op below autograd must not do.)
    return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
  }

  // The backward op itself has no derivative: create_graph=True works, but
  // differentiating these gradients raises "derivative ... not implemented".
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& mask = saved[4];
    auto [dx, dquery, dw_q, dw_k] = call_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        saved[2],
        saved[3],
        mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt,
        saved[5],
        saved[6],
        ctx->saved_data["num_heads"].toInt(),
        ctx->saved_data["scale"].toOptional<double>());
    return {dx, dquery, dw_q, dw_k, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_pool_autograd(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || query.requires_grad() || w_q.requires_grad() || w_k.requires_grad());
  if (!needs_grad) {
    // Inference: the plain kernel, nothing saved. This also keeps
    // attention_pool as one node when torch.export decomposes for inference.
    at::AutoDispatchBelowADInplaceOrView guard;
    return attnpool::attention_pool(x, query, w_q, w_k, mask, num_heads, scale);
  }
  return AttentionPoolFunction::apply(x, query, w_q, w_k, mask, num_heads, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("attention_pool", &attention_pool_autograd);
  m.impl("_attention_pool_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_attention_pool_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace attnpool
