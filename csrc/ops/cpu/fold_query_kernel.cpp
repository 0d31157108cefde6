// CPU entry points of fold_query's forward and backward: check, convert the
// weights to the accumulation dtype, cut each head's rows into pieces, and
// hand plain params to the kernels (isa/fold.h).

#include "ops/checks.h"
#include "ops/cpu/kernel_set.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace attnpool::cpu {
namespace {

// Each head's rows of the weights are cut into pieces for about this many
// tasks in all; like every cut, it depends on the shape only.
constexpr int64_t kFoldTargetTasks = 8;
// Fewest rows of the weights worth a task of their own.
constexpr int64_t kFoldMinTaskRows = 32;

FoldShape fold_shape(
    const at::Tensor& query, const at::Tensor& w_q, const at::Tensor& w_k, int64_t num_heads) {
  FoldShape s{};
  s.num_queries = query.dim() == 1 ? 1 : query.size(0);
  s.query_dim = query.size(-1);
  s.proj_dim = w_q.size(0);
  s.x_dim = w_k.size(1);
  s.num_heads = num_heads;
  const int64_t head_rows = s.proj_dim / num_heads;
  const int64_t wanted =
      std::min(at::ceil_div(kFoldTargetTasks, num_heads), head_rows / kFoldMinTaskRows);
  s.head_cut = PieceCut::into(head_rows, wanted);
  return s;
}

// A tensor as the fold kernels read it: contiguous, in the accumulation dtype.
at::Tensor acc_rows(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// How the forward reads w_q and w_k: 16-bit floats as they are, widened as
// read, which saves converting both weights on every call (1 query, 12
// heads, 768 x 768 bfloat16 weights, 2 threads, 2-core Xeon: 254 -> 50 us,
// where float32 weights take 87); in the accumulation dtype otherwise. (The
// backward still converts them: a smaller share of a training step.)
FoldWeights weights_as_read(const at::Tensor& w_q, const at::Tensor& w_k, at::ScalarType acc) {
  if (acc != at::kFloat || w_q.scalar_type() != w_k.scalar_type()) {
    return FoldWeights::kAcc;
  }
  switch (w_q.scalar_type()) {
    case at::kBFloat16:
      return FoldWeights::kBFloat16;
    case at::kHalf:
      return FoldWeights::kHalf;
    default:
      return FoldWeights::kAcc;
  }
}

std::tuple<at::Tensor, at::Tensor> fold_forward_cpu(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  detail::check_fold_query_args(query, w_q, w_k, num_heads, q_bias);
  const auto acc = detail::accumulate_dtype(query.scalar_type());
  const FoldShape s = fold_shape(query, w_q, w_k, num_heads);
  const auto queries = acc_rows(query, acc);
  const FoldWeights weights = weights_as_read(w_q, w_k, acc);
  const auto w_q_rows = weights == FoldWeights::kAcc ? acc_rows(w_q, acc) : w_q.contiguous();
  const auto w_k_rows = weights == FoldWeights::kAcc ? acc_rows(w_k, acc) : w_k.contiguous();
  const bool biased = q_bias.has_value() && q_bias->defined();
  const auto bias = biased ? acc_rows(*q_bias, acc) : at::Tensor();
  const auto options = query.options().dtype(acc);
  const auto u_shape = query.dim() == 1 ? std::vector<int64_t>{num_heads, s.x_dim}
                                        : std::vector<int64_t>{s.num_queries, num_heads, s.x_dim};
  auto projected = at::empty({s.num_queries, s.proj_dim}, options);
  auto u = at::empty(u_shape, options);
  if (projected.numel() == 0) {
    // No query, or no projection rows: u is an empty sum.
    return {u.zero_(), projected};
  }
  at::Tensor partials;
  if (s.head_cut.pieces > 1) {
    partials = at::empty({s.head_cut.pieces, s.num_queries * num_heads, s.x_dim}, options);
  }
  FoldParams p{};
  static_cast<FoldShape&>(p) = s;
  p.weights = weights;
  p.query = queries.const_data_ptr();
  p.w_q = w_q_rows.const_data_ptr();
  p.w_k = w_k_rows.const_data_ptr();
  p.q_bias = biased ? bias.const_data_ptr() : nullptr;
  p.projected = projected.mutable_data_ptr();
  p.u = u.mutable_data_ptr();
  p.partials = partials.defined() ? partials.mutable_data_ptr() : nullptr;
  selected_kernels().fold(p, acc);
  return {u, projected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_backward_cpu(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads) {
  detail::check_fold_query_backward_args(grad_u, query, w_q, w_k, projected, num_heads);
  const auto acc = detail::accumulate_dtype(query.scalar_type());
  const FoldShape s = fold_shape(query, w_q, w_k, num_heads);
  const auto queries = acc_rows(query, acc);
  const auto w_q_rows = acc_rows(w_q, acc);
  const auto w_k_rows = acc_rows(w_k, acc);
  const auto projected_rows = acc_rows(projected, acc);
  const auto grad_u_rows = acc_rows(grad_u, acc);
  const auto options = query.options().dtype(acc);
  auto grad_query = at::empty({s.num_queries, s.query_dim}, options);
  auto grad_w_q = at::empty({s.proj_dim, s.query_dim}, options);
  auto grad_w_k = at::empty({s.proj_dim, s.x_dim}, options);
  auto grad_q_bias = at::empty({s.proj_dim}, options);
  if (s.num_queries == 0 || s.proj_dim == 0) {
    // Nothing was folded: every gradient is an empty sum.
    grad_query.zero_();
    grad_w_q.zero_();
    grad_w_k.zero_();
    grad_q_bias.zero_();
  } else {
    at::Tensor partials;
    if (s.tasks() > 1) {
      partials = at::empty({s.tasks(), s.num_queries, s.query_dim}, options);
    }
    FoldBackwardParams p{};
    static_cast<FoldShape&>(p) = s;
    p.query = queries.const_data_ptr();
    p.w_q = w_q_rows.const_data_ptr();
    p.w_k = w_k_rows.const_data_ptr();
    p.projected = const_cast<void*>(projected_rows.const_data_ptr());
    p.partials = partials.defined() ? partials.mutable_data_ptr() : nullptr;
    p.grad_u = grad_u_rows.const_data_ptr();
    p.grad_query = grad_query.mutable_data_ptr();
    p.grad_w_q = grad_w_q.mutable_data_ptr();
    p.grad_w_k = grad_w_k.mutable_data_ptr();
    p.grad_q_bias = grad_q_bias.mutable_data_ptr();
    selected_kernels().fold_backward(p, acc);
  }
  const auto dtype = query.scalar_type();
  return {
      grad_query.view(query.sizes()).to(dtype),
      grad_w_q.to(dtype),
      grad_w_k.to(dtype),
      grad_q_bias.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("_fold_query_forward", &fold_forward_cpu);
  m.impl("_fold_query_backward", &fold_backward_cpu);
}

}  // namespace attnpool::cpu
