// folded_attention_pool's forward and backward as matrix products (see the
// header for where and why).

#include "ops/pool_by_matmul.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <limits>

namespace attnpool::detail {
namespace {

constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();

// a @ b (both 2-D or both 3-D) in the accumulation dtype `acc`. With 16-bit
// rows (rows_dtype != acc), both rounded to that dtype first and their
// products summed in float32, as cuBLAS does; the CPU has no such product,
// so it multiplies the rounded operands widened back.
at::Tensor product(
    const at::Tensor& a, const at::Tensor& b, at::ScalarType rows_dtype, at::ScalarType acc) {
  if (rows_dtype == acc) {
    return at::matmul(a.to(acc), b.to(acc));
  }
  const auto a16 = a.to(rows_dtype);
  const auto b16 = b.to(rows_dtype);
  if (!a.is_cuda()) {
    return at::matmul(a16.to(acc), b16.to(acc));
  }
  return a.dim() == 2 ? at::mm(a16, b16, acc) : at::bmm(a16, b16, acc);
}

// x's rows [B, L, H], with the rows that are not attended set to 0: the
// kernels never read them, and a NaN there must not reach a product.
at::Tensor attended_rows(const PreparedPool& pool) {
  const auto& p = pool.params;
  const auto rows = pool.rows.view({p.batch, p.seq_len, p.hidden});
  return pool.keep.defined() ? rows.masked_fill(pool.keep.logical_not().unsqueeze(-1), 0) : rows;
}

// [B, L, S]: scale * (x_l . u_k) + bias_l for each score k, rounded as the
// kernels round it (the product, then the sum); -inf where not attended.
at::Tensor scores_of(const PreparedPool& pool, const at::Tensor& rows) {
  const auto& p = pool.params;
  const auto flat = rows.reshape({p.batch * p.seq_len, p.hidden});
  auto scores = product(flat, pool.u.t(), rows.scalar_type(), pool.acc_dtype)
                    .view({p.batch, p.seq_len, p.num_scores()}) *
                p.scale;
  if (pool.bias.defined()) {
    scores = scores + pool.bias.unsqueeze(-1);
  }
  if (pool.keep.defined()) {
    scores = scores.masked_fill(pool.keep.logical_not().unsqueeze(-1), kMinusInfinity);
  }
  return scores;
}

// out[b, i, D_h] = sum_l weights[b, l, i * n + h] * rows[b, l, D_h], head h's
// slice D_h of d columns (all H with one head): [B, Q, H].
at::Tensor weighted_rows(
    const PreparedPool& pool, const at::Tensor& weights, const at::Tensor& rows) {
  const auto& p = pool.params;
  const auto rows_dtype = rows.scalar_type();
  if (p.num_heads == 1) {
    return product(weights.transpose(1, 2), rows, rows_dtype, pool.acc_dtype);
  }
  const auto per_head = weights.view({p.batch, p.seq_len, p.num_queries, p.num_heads});
  auto out = at::empty({p.batch, p.num_queries, p.hidden}, weights.options());
  for (int64_t h = 0; h < p.num_heads; ++h) {
    out.narrow(2, h * p.head_dim, p.head_dim)
        .copy_(product(
            per_head.select(3, h).transpose(1, 2),
            rows.narrow(2, h * p.head_dim, p.head_dim),
            rows_dtype,
            pool.acc_dtype));
  }
  return out;
}

// dp[b, l, i * n + h] = G[b, i, D_h] . rows[b, l, D_h]: [B, L, S].
at::Tensor head_products(const PreparedPool& pool, const at::Tensor& rows, const at::Tensor& grad) {
  const auto& p = pool.params;
  const auto rows_dtype = rows.scalar_type();
  if (p.num_heads == 1) {
    return product(rows, grad.transpose(1, 2), rows_dtype, pool.acc_dtype);
  }
  auto dp = at::empty(
      {p.batch, p.seq_len, p.num_queries, p.num_heads}, grad.options().dtype(pool.acc_dtype));
  for (int64_t h = 0; h < p.num_heads; ++h) {
    dp.select(3, h).copy_(product(
        rows.narrow(2, h * p.head_dim, p.head_dim),
        grad.narrow(2, h * p.head_dim, p.head_dim).transpose(1, 2),
        rows_dtype,
        pool.acc_dtype));
  }
  return dp.view({p.batch, p.seq_len, p.num_scores()});
}

// sum_i probs[b, l, i * n + h] * G[b, i, D_h], in the accumulation dtype: [B, L, H].
at::Tensor weighted_grads(
    const PreparedPool& pool, const at::Tensor& probs, const at::Tensor& grad) {
  const auto& p = pool.params;
  if (p.num_heads == 1) {
    return at::matmul(probs, grad);
  }
  const auto per_head = probs.view({p.batch, p.seq_len, p.num_queries, p.num_heads});
  auto out = at::empty({p.batch, p.seq_len, p.hidden}, probs.options());
  for (int64_t h = 0; h < p.num_heads; ++h) {
    out.narrow(2, h * p.head_dim, p.head_dim)
        .copy_(at::matmul(per_head.select(3, h), grad.narrow(2, h * p.head_dim, p.head_dim)));
  }
  return out;
}

// Whether each sequence has a row to attend: [B].
at::Tensor attends_any(const PreparedPool& pool, const at::TensorOptions& options) {
  const auto& p = pool.params;
  if (pool.keep.defined()) {
    return pool.keep.any(1);
  }
  return at::full({p.batch}, p.seq_len > 0, options.dtype(at::kBool));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_forward_by_matmul(const PreparedForward& f) {
  // Under autocast the products would run in 16 bits.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const PreparedPool& pool = f.pool;
  const auto& p = pool.params;
  const auto rows = attended_rows(pool);
  const auto scores = scores_of(pool, rows);                             // [B, L, S]
  const auto valid = attends_any(pool, scores.options()).unsqueeze(-1);  // [B, 1]
  const auto max = p.seq_len > 0
                       ? scores.amax(1)
                       : at::full({p.batch, p.num_scores()}, kMinusInfinity, scores.options());
  const auto shift = at::where(max.eq(kMinusInfinity), at::zeros_like(max), max);
  const auto exps = at::exp(scores - shift.unsqueeze(1));  // 0 where not attended
  const auto sum = exps.sum(1);                            // [B, S]
  const auto weights = exps / at::where(sum.gt(0), sum, at::ones_like(sum)).unsqueeze(1);
  const auto out = weighted_rows(pool, weights, rows);
  const auto lse = at::stack(
      {at::where(valid, max, at::full_like(max, kMinusInfinity)),
       at::where(valid, at::log(sum), at::zeros_like(sum))},
      -1);
  return {out.reshape(pool.out_shape), lse.reshape(pool.lse_shape)};
}

std::tuple<at::Tensor, at::Tensor> pool_backward_by_matmul(const PreparedBackward& g) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const PreparedPool& pool = g.pool;
  const auto& p = pool.params;
  const auto rows = attended_rows(pool);
  const auto scores = scores_of(pool, rows);  // [B, L, S], as the forward made them
  const auto lse = g.lse.view({p.batch, 1, p.num_scores(), 2});
  const auto shifted = (scores - lse.select(3, 0)) - lse.select(3, 1);
  const auto probs = at::where(scores.eq(kMinusInfinity), at::zeros_like(scores), at::exp(shifted));
  const auto grad = g.grad_out.view({p.batch, p.num_queries, p.hidden});
  const auto dp = head_products(pool, rows, grad);
  const auto delta = (probs * dp).sum(1, /*keepdim=*/true);
  const auto dscores = (probs * p.scale) * (dp - delta);  // [B, L, S]
  const auto dx = weighted_grads(pool, probs, grad) + at::matmul(dscores, pool.u);
  const auto du = product(
      dscores.reshape({p.batch * p.seq_len, p.num_scores()}).t(),
      rows.reshape({p.batch * p.seq_len, p.hidden}),
      rows.scalar_type(),
      pool.acc_dtype);
  return {dx.to(rows.scalar_type()).contiguous(), du};
}

}  // namespace attnpool::detail
