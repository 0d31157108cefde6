// folded_attention_pool_varlen (SPEC.md §6): pooling on a folded query of a
// ragged batch, x [T, H] holding the rows of B sequences one after another
// and cu_seqlens [B + 1] their offsets. Its schemas, the C++ API, the
// composite, the Meta kernels and the preparation the CPU and CUDA entry
// points share. The kernels are those of folded_attention_pool: they reach
// rows through PoolInputs (ops/pool_params.h), which knows both layouts.

#include <attnpool/attention_pool.h>

#include "ops/checks.h"
#include "ops/folded_attention_pool.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>

namespace attnpool {

at::Tensor folded_attention_pool_varlen(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::folded_attention_pool_varlen", "")
                             .typed<decltype(folded_attention_pool_varlen)>();
  return op.call(x, cu_seqlens, u, scale, full_width);
}

namespace {

constexpr const char* kOp = "folded_attention_pool_varlen";

// B comes from cu_seqlens' shape, never from its values: no host sync.
c10::SymInt ragged_batch(const at::Tensor& cu_seqlens) {
  return cu_seqlens.sym_size(0) - 1;
}

at::Tensor composite(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  const auto out = std::get<0>(
      detail::call_folded_attention_pool_varlen_forward(x, cu_seqlens, u, scale, full_width));
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  detail::check_folded_attention_pool_varlen_args(x, cu_seqlens, u, scale, full_width);
  const auto acc_options = x.options().dtype(detail::accumulate_dtype(x.scalar_type()));
  const auto batch = ragged_batch(cu_seqlens);
  return {
      at::empty_symint(detail::out_sym_shape(batch, x.sym_size(1), u, full_width), acc_options),
      at::empty_symint(detail::lse_sym_shape(batch, u), acc_options)};
}

std::tuple<at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width) {
  detail::check_folded_attention_pool_varlen_args(x, cu_seqlens, u, scale, full_width);
  detail::check_folded_attention_pool_backward_args(
      grad_out, x, u, out, lse, full_width, cu_seqlens);
  return {
      at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(u.sym_sizes(), u.options())};
}

at::Tensor jvp_meta(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent) {
  detail::check_folded_attention_pool_varlen_args(x, cu_seqlens, u, scale, full_width);
  detail::check_saved_forward("folded_attention_pool jvp", x, u, out, lse, full_width, cu_seqlens);
  detail::check_tangents(
      "folded_attention_pool jvp", x, u, std::nullopt, x_tangent, u_tangent, std::nullopt);
  return at::empty_like(out, at::MemoryFormat::Contiguous);
}

// cu_seqlens as the int64 offsets the kernels read. On the CPU the values
// are checked; on a GPU that would wait for the device, so they are clamped
// into a non-decreasing sequence within [0, T] (no read outside x, whatever
// they hold) and checked by an assertion that fails asynchronously.
at::Tensor checked_offsets(const at::Tensor& cu_seqlens, int64_t rows) {
  auto offsets = cu_seqlens.to(at::kLong).contiguous();
  if (offsets.is_cpu()) {
    detail::check_cu_seqlens_values(kOp, offsets, rows);
    return offsets;
  }
  const auto valid = offsets.select(0, 0)
                         .eq(0)
                         .logical_and(offsets.select(0, -1).eq(rows))
                         .logical_and(offsets.diff().ge(0).all());
  at::_assert_async(
      valid,
      "folded_attention_pool_varlen: cu_seqlens must start at 0, never decrease and end at "
      "T = x.shape[0]");
  return std::get<0>(offsets.clamp(0, rows).cummax(0)).contiguous();
}

detail::PreparedPool prepare_varlen_pool(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  detail::check_folded_attention_pool_varlen_args(x, cu_seqlens, u, scale, full_width);
  detail::PreparedPool prepared;
  PoolInputs& p = prepared.params;
  p = PoolInputs{};
  detail::set_query(prepared, x, cu_seqlens.size(0) - 1, u, scale, full_width);
  p.seq_len = x.size(0);
  prepared.rows = detail::with_contiguous_rows(x);
  prepared.offsets = checked_offsets(cu_seqlens, p.seq_len);
  p.x = prepared.rows.const_data_ptr();
  p.x_seq_stride = prepared.rows.stride(0);
  p.seq_offsets = prepared.offsets.const_data_ptr<int64_t>();
  return prepared;
}

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_varlen_forward(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnpool::_folded_attention_pool_varlen_forward", "")
          .typed<decltype(call_folded_attention_pool_varlen_forward)>();
  return op.call(x, cu_seqlens, u, scale, full_width);
}

std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_varlen_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnpool::_folded_attention_pool_varlen_backward", "")
          .typed<decltype(call_folded_attention_pool_varlen_backward)>();
  return op.call(grad_out, x, cu_seqlens, u, out, lse, scale, full_width);
}

PreparedForward prepare_varlen_forward(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  return forward_from(prepare_varlen_pool(x, cu_seqlens, u, scale, full_width), x);
}

PreparedBackward prepare_varlen_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width) {
  auto pool = prepare_varlen_pool(x, cu_seqlens, u, scale, full_width);
  check_folded_attention_pool_backward_args(grad_out, x, u, out, lse, full_width, cu_seqlens);
  return backward_from(std::move(pool), grad_out, x, out, lse);
}

at::Tensor ragged_first_piece(const at::Tensor& offsets, int64_t rows_per_piece) {
  if (offsets.is_cpu()) {
    // A loop, not the eight small tensor ops below: they took 15-25 us of a
    // 0.6 ms forward of 64 sequences.
    const int64_t batch = offsets.size(0) - 1;
    auto first_piece = at::empty({batch + 1}, offsets.options());
    const auto* offset = offsets.const_data_ptr<int64_t>();
    auto* first = first_piece.mutable_data_ptr<int64_t>();
    first[0] = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t length = offset[b + 1] - offset[b];
      first[b + 1] = first[b] + std::max<int64_t>(1, at::ceil_div(length, rows_per_piece));
    }
    return first_piece;
  }
  const auto lengths = offsets.diff();
  const auto pieces = lengths.add(rows_per_piece - 1).div(rows_per_piece, "floor").clamp_min(1);
  return at::cat({offsets.new_zeros({1}), pieces.cumsum(0)}).contiguous();
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def(
      "folded_attention_pool_varlen(Tensor x, Tensor cu_seqlens, Tensor u, float scale=1.0, "
      "bool full_width=False) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // As _folded_attention_pool_forward: the output in the accumulation dtype
  // and the log-sum-exp [B, (Q,) n, 2].
  m.def(
      "_folded_attention_pool_varlen_forward(Tensor x, Tensor cu_seqlens, Tensor u, "
      "float scale=1.0, bool full_width=False) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns the gradients of (x, u).
  m.def(
      "_folded_attention_pool_varlen_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, "
      "Tensor u, Tensor out, Tensor lse, float scale, bool full_width) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // As _folded_attention_pool_jvp: the output's tangent in one pass.
  m.def(
      "_folded_attention_pool_varlen_jvp(Tensor x, Tensor cu_seqlens, Tensor u, Tensor out, "
      "Tensor lse, float scale, bool full_width, Tensor? x_tangent, Tensor? u_tangent) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // For inputs with a tangent: its kernel comes from the Python package
  // (autograd/forward_ad.h).
  m.def(
      "_folded_attention_pool_varlen_forward_ad(Tensor x, Tensor cu_seqlens, Tensor u, "
      "float scale=1.0, bool full_width=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("folded_attention_pool_varlen", &composite);
}

TORCH_LIBRARY_IMPL(attnpool, Meta, m) {
  m.impl("_folded_attention_pool_varlen_forward", &forward_meta);
  m.impl("_folded_attention_pool_varlen_backward", &backward_meta);
  m.impl("_folded_attention_pool_varlen_jvp", &jvp_meta);
}

}  // namespace attnpool
