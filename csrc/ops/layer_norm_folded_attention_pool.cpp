// _layer_norm_folded_attention_pool: folded_attention_pool of
// layer_norm(x), the layer norm of open_clip's AttentionalPooler (ln_k) done
// in the pooling pass. The CPU kernels normalize each row as they load it
// (ops/cpu/isa/layer_norm.h): x is read once forward and once backward, and
// nothing of x's size is made or saved besides dx. Other devices run the
// composition here (the layer norm, then the pooling ops). Schemas, the
// composites, the Meta kernels, and the preparation the CPU entry points add
// to folded_attention_pool's.
//
// The norm is computed in the accumulation dtype and y rounded to x's dtype,
// as open_clip's LayerNorm (F.layer_norm, cast back to x's dtype) does.

#include "ops/checks.h"
#include "ops/folded_attention_pool.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace attnpool {
namespace detail {

namespace {

// weight (or ones) and bias (or zeros), [H] in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> norm_params(
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias) {
  const auto options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  const int64_t hidden = x.size(-1);
  auto weight = norm_weight.has_value() && norm_weight->defined()
                    ? norm_weight->to(options).contiguous()
                    : at::ones({hidden}, options);
  auto bias = norm_bias.has_value() && norm_bias->defined() ? norm_bias->to(options).contiguous()
                                                            : at::zeros({hidden}, options);
  return {weight, bias};
}

}  // namespace

void set_norm(
    PreparedPool& prepared,
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps) {
  check_layer_norm_args(x, norm_weight, norm_bias, norm_eps);
  std::tie(prepared.norm_weight, prepared.norm_bias) = norm_params(x, norm_weight, norm_bias);
  prepared.params.norm_weight = prepared.norm_weight.const_data_ptr();
  prepared.params.norm_bias = prepared.norm_bias.const_data_ptr();
  prepared.params.norm_eps = norm_eps;
}

std::tuple<at::Tensor, at::Tensor> call_layer_norm_pool_forward(
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
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnpool::_layer_norm_folded_attention_pool_forward", "")
          .typed<decltype(call_layer_norm_pool_forward)>();
  return op.call(
      x, u, norm_weight, norm_bias, norm_eps, mask, scale, full_width, attn_bias, lengths);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_layer_norm_pool_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnpool::_layer_norm_folded_attention_pool_backward", "")
          .typed<decltype(call_layer_norm_pool_backward)>();
  return op.call(
      grad_out,
      x,
      u,
      norm_weight,
      norm_bias,
      norm_eps,
      mask,
      out,
      lse,
      scale,
      full_width,
      attn_bias,
      lengths);
}

at::Tensor norm_gradient(const at::Tensor& grad, const std::optional<at::Tensor>& param) {
  const auto dtype =
      param.has_value() && param->defined() ? param->scalar_type() : grad.scalar_type();
  return grad.to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

at::Tensor layer_norm_rows(
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps) {
  const auto [weight, bias] = norm_params(x, norm_weight, norm_bias);
  const auto acc = accumulate_dtype(x.scalar_type());
  return at::layer_norm(x.to(acc), {x.size(-1)}, weight, bias, norm_eps).to(x.scalar_type());
}

}  // namespace detail

namespace {

// Every backend: the forward op, its output rounded to x's dtype.
at::Tensor layer_norm_pool_composite(
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
  const auto out = std::get<0>(detail::call_layer_norm_pool_forward(
      x, u, norm_weight, norm_bias, norm_eps, mask, scale, full_width, attn_bias, lengths));
  return out.to(x.scalar_type());
}

// The forward op where no fused kernel is: the norm, then the pooling op.
std::tuple<at::Tensor, at::Tensor> layer_norm_pool_forward_composite(
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
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_layer_norm_args(x, norm_weight, norm_bias, norm_eps);
  return detail::call_folded_attention_pool_forward(
      detail::layer_norm_rows(x, norm_weight, norm_bias, norm_eps),
      u,
      mask,
      scale,
      full_width,
      attn_bias,
      lengths);
}

// The backward op where no fused kernel is: the pooling op's backward on
// y = layer_norm(x), then the norm's. Rows that no score attends are zeroed
// before the norm: they may hold anything (NaN past a length), and a NaN row's
// zero gradient would still reach dx and the norm's weight as 0 * NaN.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_pool_backward_composite(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_layer_norm_args(x, norm_weight, norm_bias, norm_eps);
  const auto acc = detail::accumulate_dtype(x.scalar_type());
  const auto keep = detail::attended_positions(x, mask, attn_bias, lengths);
  const auto rows = x.to(acc).masked_fill(keep.logical_not().unsqueeze(-1), 0);
  const auto [weight, bias] = detail::norm_params(x, norm_weight, norm_bias);
  const int64_t hidden = x.size(-1);
  const auto [y, mean, rstd] = at::native_layer_norm(rows, {hidden}, weight, bias, norm_eps);
  const auto [dy, du] = detail::call_folded_attention_pool_backward(
      grad_out, y.to(x.scalar_type()), u, mask, out, lse, scale, full_width, attn_bias, lengths);
  auto [dx, dweight, dbias] = at::native_layer_norm_backward(
      dy.to(acc), rows, {hidden}, mean, rstd, weight, bias, {true, true, true});
  return {
      dx.to(x.scalar_type()),
      du,
      detail::norm_gradient(dweight, norm_weight),
      detail::norm_gradient(dbias, norm_bias)};
}

std::tuple<at::Tensor, at::Tensor> layer_norm_pool_forward_meta(
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
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_layer_norm_args(x, norm_weight, norm_bias, norm_eps);
  return detail::call_folded_attention_pool_forward(
      x, u, mask, scale, full_width, attn_bias, lengths);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_pool_backward_meta(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_layer_norm_args(x, norm_weight, norm_bias, norm_eps);
  const auto [dx, du] = detail::call_folded_attention_pool_backward(
      grad_out, x, u, mask, out, lse, scale, full_width, attn_bias, lengths);
  const auto grad = at::empty_symint(
      {x.sym_size(-1)}, x.options().dtype(detail::accumulate_dtype(x.scalar_type())));
  return {dx, du, detail::norm_gradient(grad, norm_weight), detail::norm_gradient(grad, norm_bias)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  // folded_attention_pool(layer_norm(x), u, ...): private, for the MAP heads
  // whose keys are layer-normed (attnpool.heads, open_clip's ln_k).
  m.def(
      "_layer_norm_folded_attention_pool(Tensor x, Tensor u, Tensor? norm_weight, "
      "Tensor? norm_bias, float norm_eps, Tensor? mask=None, float scale=1.0, "
      "bool full_width=False, Tensor? attn_bias=None, Tensor? lengths=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // As _folded_attention_pool_forward: the output in the accumulation dtype
  // and the log-sum-exp.
  m.def(
      "_layer_norm_folded_attention_pool_forward(Tensor x, Tensor u, Tensor? norm_weight, "
      "Tensor? norm_bias, float norm_eps, Tensor? mask=None, float scale=1.0, "
      "bool full_width=False, Tensor? attn_bias=None, Tensor? lengths=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The gradients of (x, u, norm_weight, norm_bias); those of an absent
  // weight or bias are returned all the same, in the accumulation dtype.
  m.def(
      "_layer_norm_folded_attention_pool_backward(Tensor grad_out, Tensor x, Tensor u, "
      "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, Tensor? mask, Tensor out, "
      "Tensor lse, float scale, bool full_width, Tensor? attn_bias=None, Tensor? lengths=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("_layer_norm_folded_attention_pool", &layer_norm_pool_composite);
  m.impl("_layer_norm_folded_attention_pool_forward", &layer_norm_pool_forward_composite);
  m.impl("_layer_norm_folded_attention_pool_backward", &layer_norm_pool_backward_composite);
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("_layer_norm_folded_attention_pool_forward", &layer_norm_pool_forward_meta);
  m.impl("_layer_norm_folded_attention_pool_backward", &layer_norm_pool_backward_meta);
}

}  // namespace attnpool
