// Autograd of attention_pool, registered at the Autograd key: the fold and
// the pooling each record their own node, so the backward reads the u the
// forward folded (SPEC.md §5) instead of folding again. Where projecting the
// keys is cheaper, the ATen ops of that path record theirs.

#include <attnpool/attention_pool.h>

#include "ops/attention_pool.h"
#include "ops/autograd/attn_bias.h"
#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace attnpool {
namespace {

at::Tensor attention_pool_autograd(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::refuse_attn_bias_gradient("attention_pool", attn_bias);
  const bool needs_grad = detail::any_needs_grad({&x, &query, &w_q, &w_k});
  // A tangent goes through the parts, which have forward-mode AD.
  if (!needs_grad && !detail::any_tangent({&x, &query, &w_q, &w_k}, attn_bias)) {
    // Inference: one op below autograd. This also keeps attention_pool as one
    // node when torch.export decomposes for inference.
    at::AutoDispatchBelowADInplaceOrView guard;
    return attnpool::attention_pool(x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths);
  }
  return detail::compose_attention_pool(
      x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, Autograd, m) {
  m.impl("attention_pool", &attention_pool_autograd);
}

}  // namespace attnpool
