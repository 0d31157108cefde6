// attnpool::_attention_without_subnormals and its backward: their schemas,
// their checks and their kernels from ATen ops for every device but the
// CPU's backward (ops/cpu/attention_backward_kernel.cpp), Meta included.

#include "ops/attention_without_subnormals.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace attnpool::detail {
namespace {

constexpr const char* kOp = "attnpool::_attention_without_subnormals";

void check_heads(const char* name, const at::Tensor& t, const at::Tensor& query) {
  TORCH_CHECK_VALUE(
      t.dim() == 4, kOp, ": ", name, " must be 4-D [B, n, L, d], got shape ", t.sym_sizes());
  TORCH_CHECK_VALUE(
      t.sym_size(0) == query.sym_size(0) && t.sym_size(1) == query.sym_size(1) &&
          t.sym_size(3) == query.sym_size(3),
      kOp,
      ": ",
      name,
      " must have query's batch, heads and head width [",
      query.sym_size(0),
      ", ",
      query.sym_size(1),
      ", L, ",
      query.sym_size(3),
      "], got shape ",
      t.sym_sizes());
  TORCH_CHECK_TYPE(
      t.scalar_type() == query.scalar_type(),
      kOp,
      ": ",
      name,
      " must have query's dtype ",
      query.scalar_type(),
      ", got ",
      t.scalar_type());
  TORCH_CHECK_VALUE(
      t.device() == query.device(),
      kOp,
      ": ",
      name,
      " must be on query's device ",
      query.device(),
      ", got ",
      t.device());
}

}  // namespace

void check_attention_without_subnormals_args(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(query.scalar_type()),
      kOp,
      ": query must be floating point, got ",
      query.scalar_type());
  TORCH_CHECK_VALUE(
      query.dim() == 4, kOp, ": query must be 4-D [B, n, Q, d], got shape ", query.sym_sizes());
  check_heads("key", key, query);
  check_heads("value", value, query);
  TORCH_CHECK_VALUE(
      value.sym_size(2) == key.sym_size(2),
      kOp,
      ": value must have key's length ",
      key.sym_size(2),
      ", got shape ",
      value.sym_sizes());
  if (attn_mask.has_value()) {
    TORCH_CHECK_TYPE(
        attn_mask->scalar_type() == query.scalar_type(),
        kOp,
        ": attn_mask must be additive in query's dtype ",
        query.scalar_type(),
        ", got ",
        attn_mask->scalar_type());
  }
}

at::Tensor attention_without_subnormals(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_attention_without_subnormals", "")
                             .typed<at::Tensor(
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 const std::optional<at::Tensor>&,
                                 double)>();
  return op.call(query, key, value, attn_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_without_subnormals_backward(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& out,
    const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnpool::_attention_without_subnormals_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&,
              const at::Tensor&,
              const at::Tensor&,
              const at::Tensor&,
              const at::Tensor&,
              const at::Tensor&,
              const std::optional<at::Tensor>&,
              double)>();
  return op.call(grad_out, query, key, value, out, logsumexp, attn_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_without_subnormals_backward_by_aten(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& out,
    const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  check_attention_without_subnormals_args(query, key, value, attn_mask);
  return at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad_out,
      query,
      key,
      value,
      out,
      logsumexp,
      /*dropout_p=*/0.0,
      /*is_causal=*/false,
      attn_mask,
      scale);
}

namespace {

at::Tensor attention_by_aten(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  check_attention_without_subnormals_args(query, key, value, attn_mask);
  return at::scaled_dot_product_attention(
      query, key, value, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
}

}  // namespace
}  // namespace attnpool::detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def(
      "_attention_without_subnormals(Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_attention_without_subnormals_backward(Tensor grad_out, Tensor query, Tensor key, "
      "Tensor value, Tensor out, Tensor logsumexp, Tensor? attn_mask, float scale) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("_attention_without_subnormals", &attnpool::detail::attention_by_aten);
  m.impl(
      "_attention_without_subnormals_backward",
      &attnpool::detail::attention_without_subnormals_backward_by_aten);
}
