// fold_query (SPEC.md §5): u[i, h] = w_k[D_h].T @ (w_q @ query[i] + q_bias)[D_h],
// the query folded through both projections so that scores need no key
// projection. Its schema and the schemas of its forward and backward ops, the
// C++ API, the composite that serves every backend, the Meta kernels, and the
// fold as matrix products (the CUDA kernels).

#include "ops/fold_query.h"

#include <attnpool/attention_pool.h>

#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace attnpool {

at::Tensor fold_query(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::fold_query", "")
                             .typed<decltype(fold_query)>();
  return op.call(query, w_q, w_k, num_heads, q_bias);
}

namespace {

c10::SymInt num_queries(const at::Tensor& query) {
  return query.dim() == 1 ? c10::SymInt(1) : query.sym_size(0);
}

// [Q, n, Hx], or [n, Hx] for a 1-D query.
std::vector<c10::SymInt> u_sym_shape(const at::Tensor& query, const at::Tensor& w_k, int64_t n) {
  if (query.dim() == 1) {
    return {c10::SymInt(n), w_k.sym_size(1)};
  }
  return {query.sym_size(0), c10::SymInt(n), w_k.sym_size(1)};
}

at::Tensor fold_query_composite(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  return std::get<0>(detail::call_fold_query_forward(query, w_q, w_k, num_heads, q_bias));
}

std::tuple<at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  detail::check_fold_query_args(query, w_q, w_k, num_heads, q_bias);
  const auto acc_options = query.options().dtype(detail::accumulate_dtype(query.scalar_type()));
  return {
      at::empty_symint(u_sym_shape(query, w_k, num_heads), acc_options),
      at::empty_symint({num_queries(query), w_q.sym_size(0)}, acc_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads) {
  detail::check_fold_query_backward_args(grad_u, query, w_q, w_k, projected, num_heads);
  return {
      at::empty_symint(query.sym_sizes(), query.options()),
      at::empty_symint(w_q.sym_sizes(), w_q.options()),
      at::empty_symint(w_k.sym_sizes(), w_k.options()),
      at::empty_symint({w_q.sym_size(0)}, query.options())};
}

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor> call_fold_query_forward(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_fold_query_forward", "")
                             .typed<decltype(call_fold_query_forward)>();
  return op.call(query, w_q, w_k, num_heads, q_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_fold_query_backward(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_fold_query_backward", "")
                             .typed<decltype(call_fold_query_backward)>();
  return op.call(grad_u, query, w_q, w_k, projected, num_heads);
}

std::tuple<at::Tensor, at::Tensor> fold_query_by_matmul(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  check_fold_query_args(query, w_q, w_k, num_heads, q_bias);
  // Under autocast these products would run in float16/bfloat16; u is needed
  // in the accumulation dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto acc = accumulate_dtype(query.scalar_type());
  const int64_t Q = query.dim() == 1 ? 1 : query.size(0);
  const int64_t E = w_q.size(0);
  const int64_t d = E / num_heads;
  auto projected = at::matmul(query.to(acc).reshape({Q, query.size(-1)}), w_q.to(acc).t());
  if (q_bias.has_value() && q_bias->defined()) {
    projected = projected + q_bias->to(acc);
  }
  // u[i, h] = q'[i, D_h] @ w_k[D_h]: one [Q, d] x [d, Hx] product per head.
  const auto per_head_query = projected.view({Q, num_heads, d}).transpose(0, 1);
  const auto per_head_wk = w_k.to(acc).reshape({num_heads, d, w_k.size(1)});
  const auto u = at::bmm(per_head_query, per_head_wk).transpose(0, 1);
  const auto u_shape = query.dim() == 1 ? std::vector<int64_t>{num_heads, w_k.size(1)}
                                        : std::vector<int64_t>{Q, num_heads, w_k.size(1)};
  return {u.contiguous().view(u_shape), projected.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_query_backward_by_matmul(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads) {
  check_fold_query_backward_args(grad_u, query, w_q, w_k, projected, num_heads);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto acc = accumulate_dtype(query.scalar_type());
  const int64_t Q = query.dim() == 1 ? 1 : query.size(0);
  const int64_t E = w_q.size(0);
  const int64_t Hx = w_k.size(1);
  const int64_t d = E / num_heads;
  // Per head h: du_h [Q, Hx], q'_h [Q, d], w_k_h [d, Hx].
  const auto du = grad_u.to(acc).reshape({Q, num_heads, Hx}).transpose(0, 1);
  const auto qp = projected.to(acc).reshape({Q, num_heads, d}).transpose(0, 1);
  const auto wk = w_k.to(acc).reshape({num_heads, d, Hx});
  // dq'_h = du_h @ w_k_h.T, dw_k_h = q'_h.T @ du_h
  const auto grad_projected = at::bmm(du, wk.transpose(1, 2)).transpose(0, 1).reshape({Q, E});
  const auto grad_wk = at::bmm(qp.transpose(1, 2), du).reshape({E, Hx});
  const auto queries = query.to(acc).reshape({Q, query.size(-1)});
  const auto grad_wq = at::matmul(grad_projected.t(), queries);
  const auto grad_query = at::matmul(grad_projected, w_q.to(acc));
  const auto grad_bias = grad_projected.sum(0);
  const auto dtype = query.scalar_type();
  return {
      grad_query.reshape(query.sizes()).to(dtype),
      grad_wq.to(dtype),
      grad_wk.to(dtype),
      grad_bias.to(dtype)};
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def(
      "fold_query(Tensor query, Tensor w_q, Tensor w_k, int num_heads=1, Tensor? q_bias=None) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Forward for training: u and projected = w_q @ query + q_bias [Q, E], which
  // the backward reads instead of computing it again.
  m.def(
      "_fold_query_forward(Tensor query, Tensor w_q, Tensor w_k, int num_heads=1, "
      "Tensor? q_bias=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns the gradients of (query, w_q, w_k, q_bias).
  m.def(
      "_fold_query_backward(Tensor grad_u, Tensor query, Tensor w_q, Tensor w_k, "
      "Tensor projected, int num_heads) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // fold_query for inputs with a tangent: its kernel comes from the Python
  // package (autograd/forward_ad.h).
  m.def(
      "_fold_query_forward_ad(Tensor query, Tensor w_q, Tensor w_k, int num_heads=1, "
      "Tensor? q_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("fold_query", &fold_query_composite);
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("_fold_query_forward", &forward_meta);
  m.impl("_fold_query_backward", &backward_meta);
}

}  // namespace attnpool
