// The attention_pool operators: schemas (defined once, here), the C++ API that
// calls them through the dispatcher, and their Meta kernels (shapes only,
// symbolic-size aware) used by torch.compile, torch.export and FakeTensor.

#include <attnpool/attention_pool.h>

#include "ops/attention_pool_common.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace attnpool {

at::Tensor attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::attention_pool", "")
                             .typed<decltype(attention_pool)>();
  return op.call(x, query, w_q, w_k, mask, num_heads, scale);
}

namespace {

std::vector<c10::SymInt> output_sym_shape(const at::Tensor& x, const at::Tensor& query) {
  if (query.dim() == 1) {
    return {x.sym_size(0), x.sym_size(2)};
  }
  return {x.sym_size(0), query.sym_size(0), x.sym_size(2)};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_forward_meta(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  detail::check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  const c10::SymInt num_queries = query.dim() == 1 ? c10::SymInt(1) : query.sym_size(0);
  const auto acc_options = x.options().dtype(detail::accumulate_dtype(x.scalar_type()));
  auto out = at::empty_symint(output_sym_shape(x, query), acc_options);
  auto lse = at::empty_symint({x.sym_size(0), num_queries, c10::SymInt(num_heads)}, acc_options);
  return {out, lse};
}

at::Tensor attention_pool_meta(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  detail::check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  return at::empty_symint(output_sym_shape(x, query), x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_backward_meta(
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
  detail::check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  detail::check_attention_pool_backward_args(grad_out, x, query, out, lse, num_heads);
  return {
      at::empty_symint(x.sym_sizes(), x.options()),
      at::empty_symint(query.sym_sizes(), query.options()),
      at::empty_symint(w_q.sym_sizes(), w_q.options()),
      at::empty_symint(w_k.sym_sizes(), w_k.options())};
}

}  // namespace

TORCH_LIBRARY(attnpool, m) {
  m.def(
      "attention_pool(Tensor x, Tensor query, Tensor w_q, Tensor w_k, Tensor? mask=None, "
      "int num_heads=1, float? scale=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Forward for training: returns the output in the accumulation dtype
  // (float32, or float64 for float64 x) and the log-sum-exp [B, Q, num_heads]
  // that the backward recomputes the softmax from.
  m.def(
      "_attention_pool_forward(Tensor x, Tensor query, Tensor w_q, Tensor w_k, "
      "Tensor? mask=None, int num_heads=1, float? scale=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns the gradients of (x, query, w_q, w_k).
  m.def(
      "_attention_pool_backward(Tensor grad_out, Tensor x, Tensor query, Tensor w_q, "
      "Tensor w_k, Tensor? mask, Tensor out, Tensor lse, int num_heads, float? scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("attention_pool", &attention_pool_meta);
  m.impl("_attention_pool_forward", &attention_pool_forward_meta);
  m.impl("_attention_pool_backward", &attention_pool_backward_meta);
}

}  // namespace attnpool
