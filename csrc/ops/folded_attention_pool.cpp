// folded_attention_pool (SPEC.md §5): pooling of x with an already folded
// query u. Its schema and the schemas of its forward and backward ops, the
// C++ API, the composite that serves every backend, the Meta kernels, and the
// preparation of the inputs that the CPU and CUDA entry points share.
//
// Full width: out[b, i, h, :] = sum_l p[b, i, h, l] * x[b, l, :] is the slice
// pooling of num_queries * num_heads one-head queries (with one head, a
// head's slice is the whole row), so prepare_pool hands the kernels that
// shape and they know one mode only.

#include "ops/folded_attention_pool.h"

#include <attnpool/attention_pool.h>

#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace attnpool {

at::Tensor folded_attention_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::folded_attention_pool", "")
                             .typed<decltype(folded_attention_pool)>();
  return op.call(x, u, mask, scale, full_width, attn_bias, lengths);
}

namespace detail {

std::vector<c10::SymInt> out_sym_shape(
    const c10::SymInt& batch, const c10::SymInt& hidden, const at::Tensor& u, bool full_width) {
  std::vector<c10::SymInt> shape{batch};
  if (u.dim() == 3) {
    shape.push_back(u.sym_size(0));
  }
  if (full_width) {
    shape.push_back(u.sym_size(-2));
  }
  shape.push_back(hidden);
  return shape;
}

std::vector<c10::SymInt> lse_sym_shape(const c10::SymInt& batch, const at::Tensor& u) {
  std::vector<c10::SymInt> shape{batch};
  for (int64_t dim = 0; dim + 1 < u.dim(); ++dim) {
    shape.push_back(u.sym_size(dim));
  }
  shape.push_back(2);
  return shape;
}

std::vector<int64_t> concrete(const std::vector<c10::SymInt>& shape) {
  std::vector<int64_t> sizes;
  sizes.reserve(shape.size());
  for (const auto& size : shape) {
    sizes.push_back(size.expect_int());
  }
  return sizes;
}

void set_query(
    PreparedPool& prepared,
    const at::Tensor& x,
    int64_t batch,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  PoolInputs& p = prepared.params;
  const int64_t num_heads = u.size(-2);
  const int64_t num_queries = u.dim() == 3 ? u.size(0) : 1;
  p.batch = batch;
  p.hidden = x.size(-1);
  p.num_queries = full_width ? num_queries * num_heads : num_queries;
  p.num_heads = full_width ? 1 : num_heads;
  p.head_dim = p.hidden / p.num_heads;
  p.scale = scale;
  prepared.acc_dtype = accumulate_dtype(x.scalar_type());
  prepared.u = u.to(prepared.acc_dtype).reshape({p.num_scores(), p.hidden}).contiguous();
  p.u = prepared.u.const_data_ptr();
  prepared.out_shape = concrete(out_sym_shape(batch, x.sym_size(-1), u, full_width));
  prepared.lse_shape = concrete(lse_sym_shape(batch, u));
}

}  // namespace detail

namespace {

// Every backend: the forward op, its output rounded to x's dtype.
at::Tensor folded_attention_pool_composite(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  const auto out = std::get<0>(detail::call_folded_attention_pool_forward(
      x, u, mask, scale, full_width, attn_bias, lengths));
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  const auto acc_options = x.options().dtype(detail::accumulate_dtype(x.scalar_type()));
  return {
      at::empty_symint(
          detail::out_sym_shape(x.sym_size(0), x.sym_size(2), u, full_width), acc_options),
      at::empty_symint(detail::lse_sym_shape(x.sym_size(0), u), acc_options)};
}

std::tuple<at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_folded_attention_pool_backward_args(grad_out, x, u, out, lse, full_width);
  return {
      at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(u.sym_sizes(), u.options())};
}

at::Tensor jvp_meta(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent,
    const std::optional<at::Tensor>& bias_tangent) {
  detail::check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_saved_forward("folded_attention_pool jvp", x, u, out, lse, full_width);
  detail::check_tangents(
      "folded_attention_pool jvp", x, u, attn_bias, x_tangent, u_tangent, bias_tangent);
  return at::empty_like(out, at::MemoryFormat::Contiguous);
}

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_forward(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_folded_attention_pool_forward", "")
                             .typed<decltype(call_folded_attention_pool_forward)>();
  return op.call(x, u, mask, scale, full_width, attn_bias, lengths);
}

std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_folded_attention_pool_backward", "")
                             .typed<decltype(call_folded_attention_pool_backward)>();
  return op.call(grad_out, x, u, mask, out, lse, scale, full_width, attn_bias, lengths);
}

PreparedPool prepare_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  check_folded_attention_pool_args(x, u, mask, scale, full_width, attn_bias, lengths);
  PreparedPool prepared;
  PoolInputs& p = prepared.params;
  p = PoolInputs{};
  set_query(prepared, x, x.size(0), u, scale, full_width);
  p.seq_len = x.size(1);
  prepared.rows = with_contiguous_rows(x);
  prepared.keep = bool_mask(mask);
  if (attn_bias.has_value() && attn_bias->defined()) {
    prepared.bias = attn_bias->to(prepared.acc_dtype).contiguous();
    // A -inf bias gives its position weight 0 in every score, as the mask
    // does; the kernels skip such rows, so NaN there cannot reach the output.
    const auto finite = prepared.bias.ne(-std::numeric_limits<double>::infinity());
    prepared.keep = prepared.keep.defined() ? prepared.keep.logical_and(finite) : finite;
  }
  if (lengths.has_value() && lengths->defined()) {
    // Right padding as a mask: the kernels never load a masked row, so the
    // rows past a length are never read, and their dx rows are zeros.
    const auto within = within_lengths(p.seq_len, *lengths);
    prepared.keep = prepared.keep.defined() ? prepared.keep.logical_and(within) : within;
  }

  p.x = prepared.rows.const_data_ptr();
  p.x_batch_stride = prepared.rows.stride(0);
  p.x_seq_stride = prepared.rows.stride(1);
  const bool masked = prepared.keep.defined();
  p.mask = masked ? prepared.keep.const_data_ptr<bool>() : nullptr;
  p.mask_batch_stride = masked ? prepared.keep.stride(0) : 0;
  p.mask_seq_stride = masked ? prepared.keep.stride(1) : 0;
  p.bias = prepared.bias.defined() ? prepared.bias.const_data_ptr() : nullptr;
  return prepared;
}

PreparedForward forward_from(PreparedPool pool, const at::Tensor& x) {
  PreparedForward f;
  f.pool = std::move(pool);
  const auto acc_options = x.options().dtype(f.pool.acc_dtype);
  f.out = at::empty(f.pool.out_shape, acc_options);
  f.lse = at::empty(f.pool.lse_shape, acc_options);
  f.params = ForwardParams{};
  static_cast<PoolInputs&>(f.params) = f.pool.params;
  f.params.out = f.out.mutable_data_ptr();
  f.params.lse = f.lse.mutable_data_ptr();
  return f;
}

PreparedForward prepare_forward(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  return forward_from(prepare_pool(x, u, mask, scale, full_width, attn_bias, lengths), x);
}

PreparedBackward backward_from(
    PreparedPool pool,
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& out,
    const at::Tensor& lse) {
  PreparedBackward g;
  g.pool = std::move(pool);
  const auto acc_dtype = g.pool.acc_dtype;
  g.grad_out = grad_out.to(acc_dtype).contiguous();
  g.out = out.to(acc_dtype).contiguous();
  g.lse = lse.contiguous();
  g.dx = at::empty(x.sizes(), x.options());
  g.du =
      at::empty({g.pool.params.num_scores(), g.pool.params.hidden}, x.options().dtype(acc_dtype));
  g.params = BackwardParams{};
  static_cast<PoolInputs&>(g.params) = g.pool.params;
  g.params.grad_out = g.grad_out.const_data_ptr();
  g.params.out = const_cast<void*>(g.out.const_data_ptr());
  g.params.lse = const_cast<void*>(g.lse.const_data_ptr());
  g.params.dx = g.dx.mutable_data_ptr();
  g.params.du = g.du.mutable_data_ptr();
  return g;
}

PreparedBackward prepare_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  auto pool = prepare_pool(x, u, mask, scale, full_width, attn_bias, lengths);
  check_folded_attention_pool_backward_args(grad_out, x, u, out, lse, full_width);
  return backward_from(std::move(pool), grad_out, x, out, lse);
}

std::tuple<at::Tensor, at::Tensor> PreparedBackward::gradients(const at::Tensor& u) const {
  return {dx, du.view(u.sizes()).to(u.scalar_type())};
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def(
      "folded_attention_pool(Tensor x, Tensor u, Tensor? mask=None, float scale=1.0, "
      "bool full_width=False, Tensor? attn_bias=None, Tensor? lengths=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Forward for training: the output in the accumulation dtype (float32, or
  // float64 for float64 x) and the log-sum-exp [B, (Q,) n] that the backward
  // recomputes the softmax from.
  m.def(
      "_folded_attention_pool_forward(Tensor x, Tensor u, Tensor? mask=None, float scale=1.0, "
      "bool full_width=False, Tensor? attn_bias=None, Tensor? lengths=None) -> "
      "(Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns the gradients of (x, u).
  m.def(
      "_folded_attention_pool_backward(Tensor grad_out, Tensor x, Tensor u, Tensor? mask, "
      "Tensor out, Tensor lse, float scale, bool full_width, Tensor? attn_bias=None, "
      "Tensor? lengths=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Forward-mode AD: the tangent of the forward's (unrounded) output from its
  // out and lse and the tangents of x, u and attn_bias (each optional), in one
  // pass over x and x_tangent. CPU kernel here; other devices get the Python
  // package's composition (attnpool/_transforms.py).
  m.def(
      "_folded_attention_pool_jvp(Tensor x, Tensor u, Tensor? mask, Tensor out, Tensor lse, "
      "float scale, bool full_width, Tensor? attn_bias, Tensor? lengths, Tensor? x_tangent, "
      "Tensor? u_tangent, Tensor? bias_tangent) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // folded_attention_pool for inputs with a tangent: its kernel comes from the
  // Python package (autograd/forward_ad.h).
  m.def(
      "_folded_attention_pool_forward_ad(Tensor x, Tensor u, Tensor? mask=None, "
      "float scale=1.0, bool full_width=False, Tensor? attn_bias=None, Tensor? lengths=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("folded_attention_pool", &folded_attention_pool_composite);
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("_folded_attention_pool_forward", &forward_meta);
  m.impl("_folded_attention_pool_backward", &backward_meta);
  m.impl("_folded_attention_pool_jvp", &jvp_meta);
}

}  // namespace attnpool
