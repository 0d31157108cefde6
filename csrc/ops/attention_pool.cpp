// attention_pool (SPEC.md §1): its schema, the C++ API, and the kernel that
// serves every backend (Meta included): the fold, then pooling on the folded
// query, or, where that costs less, pooling on projected keys. Its autograd kernel
// (autograd/attention_pool_autograd.cpp) runs the same composition through the parts' own autograd,
// so the backward reads the u the forward folded instead of folding again.

#include "ops/attention_pool.h"

#include <attnpool/attention_pool.h>

#include "ops/checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace attnpool {

at::Tensor attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::attention_pool", "")
                             .typed<decltype(attention_pool)>();
  return op.call(x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths);
}

at::Tensor attention_pool_varlen(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::attention_pool_varlen", "")
                             .typed<decltype(attention_pool_varlen)>();
  return op.call(x, cu_seqlens, query, w_q, w_k, num_heads, scale);
}

namespace {

// The fold, then pooling of the ragged batch on the folded query. Composite
// at CompositeImplicitAutograd: the parts bring their own autograd, Meta and
// device kernels.
at::Tensor compose_attention_pool_varlen(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale) {
  const double resolved =
      detail::checked_attention_pool_varlen_scale(x, cu_seqlens, query, w_q, w_k, num_heads, scale);
  const auto u = attnpool::fold_query(query, w_q, w_k, num_heads, std::nullopt);
  const detail::ValuesCheckedFor values_checked_for("attention_pool_varlen");
  return attnpool::folded_attention_pool_varlen(x, cu_seqlens, u, resolved, /*full_width=*/false);
}

}  // namespace

namespace detail {
namespace {

// The given scale, or 1/sqrt(hidden / num_heads). The default needs the head
// size as a number: under torch.compile with dynamic shapes this specialises
// on H.
double scale_for_heads(const c10::SymInt& hidden, int64_t num_heads, std::optional<double> scale) {
  return scale.has_value()
             ? *scale
             : resolve_scale(std::nullopt, (hidden / num_heads).guard_int(__FILE__, __LINE__));
}

}  // namespace

double checked_attention_pool_scale(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths);
  return scale_for_heads(x.sym_size(2), num_heads, scale);
}

double checked_attention_pool_varlen_scale(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale) {
  check_attention_pool_varlen_args(x, cu_seqlens, query, w_q, w_k, num_heads, scale);
  return scale_for_heads(x.sym_size(1), num_heads, scale);
}

at::Tensor compose_attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  const double resolved =
      checked_attention_pool_scale(x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths);
  const int64_t num_queries =
      query.dim() == 1 ? 1 : query.sym_size(0).guard_int(__FILE__, __LINE__);
  const bool empty = x.sym_numel() == 0;
  if (!empty && projecting_keys_is_cheaper(
                    num_queries, num_heads, x.sym_size(2).guard_int(__FILE__, __LINE__))) {
    return pool_by_projection(x, query, w_q, w_k, mask, num_heads, resolved, attn_bias, lengths);
  }
  const auto u = attnpool::fold_query(query, w_q, w_k, num_heads, std::nullopt);
  return attnpool::folded_attention_pool(
      x, u, mask, resolved, /*full_width=*/false, attn_bias, lengths);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def(
      "attention_pool(Tensor x, Tensor query, Tensor w_q, Tensor w_k, Tensor? mask=None, "
      "int num_heads=1, float? scale=None, Tensor? attn_bias=None, Tensor? lengths=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_pool_varlen(Tensor x, Tensor cu_seqlens, Tensor query, Tensor w_q, Tensor w_k, "
      "int num_heads=1, float? scale=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The ops' checks of x and of mask, attn_bias and lengths against it, for
  // callers that pool without the ops (MultiheadAttentionPooling when it
  // projects the keys); errors name `op`. An op, not a function of the
  // Python module, so that torch.compile traces it (it reads sizes only)
  // and TorchScript can call it. Conservative alias analysis marks it as
  // having side effects, so that TorchScript keeps a call with no result.
  m.def(
      torch::schema(
          "_check_pooled_positions(str op, Tensor x, Tensor? mask=None, Tensor? attn_bias=None, "
          "Tensor? lengths=None) -> ()",
          c10::AliasAnalysisKind::CONSERVATIVE),
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(attnpool, CompositeImplicitAutograd, m) {
  m.impl("attention_pool_varlen", &compose_attention_pool_varlen);
  m.impl("_check_pooled_positions", &detail::check_pooled_positions);
}

// Under vmap the checks see each sample's sizes (those of a batched tensor
// are the logical ones); vmap's fallback runs no op without a result.
TORCH_LIBRARY_IMPL(attnpool, FuncTorchBatched, m) {
  m.impl("_check_pooled_positions", &detail::check_pooled_positions);
}

// Meta is named as well: fake tensors look for a kernel registered at Meta itself.
TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("attention_pool", &detail::compose_attention_pool);
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("attention_pool", &detail::compose_attention_pool);
}

}  // namespace attnpool
