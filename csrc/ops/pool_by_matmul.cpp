// folded_attention_pool's forward and backward as matrix products (see the
// header for where and why).

#include "ops/pool_by_matmul.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#ifdef ATTNPOOL_WITH_CUDA
#include "ops/cuda/score_softmax.h"
#endif

#include <limits>
#include <utility>

namespace attnpool::detail {
namespace {

constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();

// t as two bfloat16 terms, t ~ hi + lo: about 16 of float32's 24
// significant bits, where bfloat16 alone keeps 8. Rounding the weights or
// ds to bfloat16 moved outputs and gradients past the reference's bfloat16
// tolerance on an H200 (sharp softmax, sums that cancel).
std::pair<at::Tensor, at::Tensor> bfloat16_terms(const at::Tensor& t) {
  auto hi = t.to(at::kBFloat16);
  auto lo = (t - hi.to(t.scalar_type())).to(at::kBFloat16);
  return {std::move(hi), std::move(lo)};
}

// a @ b of bfloat16 operands (both 2-D or both 3-D), their products summed
// in `acc` as cuBLAS does; the CPU has no such product, so it multiplies
// them widened back.
at::Tensor bfloat16_product(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (!a.is_cuda()) {
    return at::matmul(a.to(acc), b.to(acc));
  }
  return a.dim() == 2 ? at::mm(a, b, acc) : at::bmm(a, b, acc);
}

// The sum of the two halves of `all` along `dim`.
at::Tensor sum_of_halves(const at::Tensor& all, int64_t dim) {
  const auto half = all.size(dim) / 2;
  return all.narrow(dim, 0, half) + all.narrow(dim, half, half);
}

// a @ b (both 2-D or both 3-D) in the accumulation dtype `acc`, where one
// operand holds x's rows. With bfloat16 rows the other operand, when it is
// not bfloat16 already, enters as its two bfloat16 terms, stacked so that
// one product still reads the rows once. float16 rows are widened instead:
// float16's range would flush the small weights and gradients (ds of 1e-7)
// to zero.
at::Tensor product(
    const at::Tensor& a, const at::Tensor& b, at::ScalarType rows_dtype, at::ScalarType acc) {
  if (rows_dtype != at::kBFloat16) {
    return at::matmul(a.to(acc), b.to(acc));
  }
  if (a.scalar_type() != at::kBFloat16) {  // [.., M, K]: rows of hi, then of lo
    const auto [hi, lo] = bfloat16_terms(a);
    return sum_of_halves(bfloat16_product(at::cat({hi, lo}, -2), b, acc), -2);
  }
  if (b.scalar_type() != at::kBFloat16) {  // [.., K, N]: columns of hi, then of lo
    const auto [hi, lo] = bfloat16_terms(b);
    return sum_of_halves(bfloat16_product(a, at::cat({hi, lo}, -1), acc), -1);
  }
  return bfloat16_product(a, b, acc);
}

// x's rows [B, L, H], with the rows that are not attended set to 0: the
// kernels never read them, and a NaN there must not reach a product.
at::Tensor attended_rows(const PreparedPool& pool) {
  const auto& p = pool.params;
  const auto rows = pool.rows.view({p.batch, p.seq_len, p.hidden});
  return pool.keep.defined() ? rows.masked_fill(pool.keep.logical_not().unsqueeze(-1), 0) : rows;
}

// [B, L, S]: x_l . u_k for each score k (before scale and bias).
at::Tensor products_of(const PreparedPool& pool, const at::Tensor& rows) {
  const auto& p = pool.params;
  const auto flat = rows.reshape({p.batch * p.seq_len, p.hidden});
  return product(flat, pool.u.t(), rows.scalar_type(), pool.acc_dtype)
      .view({p.batch, p.seq_len, p.num_scores()});
}

// [B, L, S]: scale * product + bias_l, rounded as the kernels round it (the
// product, then the sum); -inf where not attended.
at::Tensor scores_from(
    const at::Tensor& products, const at::Tensor& bias, const at::Tensor& keep, double scale) {
  auto scores = products * scale;
  if (bias.defined()) {
    scores = scores + bias.unsqueeze(-1);
  }
  if (keep.defined()) {
    scores = scores.masked_fill(keep.logical_not().unsqueeze(-1), kMinusInfinity);
  }
  return scores;
}

at::Tensor contiguous_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.contiguous() : t;
}

// The softmax of the scores and its backward: two kernels each on a GPU
// (ops/cuda/score_softmax_kernel.cuh), tensor operators elsewhere.
std::tuple<at::Tensor, at::Tensor> score_softmax(
    const PreparedPool& pool, const at::Tensor& products) {
#ifdef ATTNPOOL_WITH_CUDA
  if (products.is_cuda()) {
    return score_softmax_cuda(
        products, pool.bias, contiguous_or_undefined(pool.keep), pool.params.scale);
  }
#endif
  return score_softmax_by_operators(products, pool.bias, pool.keep, pool.params.scale);
}

std::tuple<at::Tensor, at::Tensor> score_softmax_backward(
    const PreparedPool& pool,
    const at::Tensor& products,
    const at::Tensor& lse,
    const at::Tensor& dp) {
#ifdef ATTNPOOL_WITH_CUDA
  if (products.is_cuda()) {
    return score_softmax_backward_cuda(
        products, pool.bias, contiguous_or_undefined(pool.keep), pool.params.scale, lse, dp);
  }
#endif
  return score_softmax_backward_by_operators(
      products, pool.bias, pool.keep, pool.params.scale, lse, dp);
}

// With several heads, each product below runs over all H columns for every
// score (n times the multiply-adds of one product per head's slice, which
// took 2n launches a pass): a call then launches the same few kernels
// whatever its heads, which matters at BERT size, where launches cost more
// than the products.

// [B, Q, H] of [B, Q * n, H]: each score (i, h) keeps its head's slice D_h.
at::Tensor own_slices(const PoolInputs& p, const at::Tensor& all) {
  if (p.num_heads == 1) {
    return all;
  }
  const auto blocks = all.view({p.batch, p.num_queries, p.num_heads, p.num_heads, p.head_dim});
  return at::diagonal(blocks, 0, 2, 3)  // [B, Q, d, n]: [b, i, c, h] = blocks[b, i, h, h, c]
      .permute({0, 1, 3, 2})
      .reshape({p.batch, p.num_queries, p.hidden});
}

// [B, Q * n, H] of G [B, Q, H]: score (i, h)'s row holds G[b, i, D_h] in its
// slice D_h and zeros elsewhere.
at::Tensor slice_blocks(const PoolInputs& p, const at::Tensor& grad) {
  if (p.num_heads == 1) {
    return grad;
  }
  auto blocks =
      at::zeros({p.batch, p.num_queries, p.num_heads, p.num_heads, p.head_dim}, grad.options());
  at::diagonal(blocks, 0, 2, 3)
      .copy_(grad.view({p.batch, p.num_queries, p.num_heads, p.head_dim}).permute({0, 1, 3, 2}));
  return blocks.view({p.batch, p.num_scores(), p.hidden});
}

// out[b, i, D_h] = sum_l weights[b, l, i * n + h] * rows[b, l, D_h]: [B, Q, H].
at::Tensor weighted_rows(
    const PreparedPool& pool, const at::Tensor& weights, const at::Tensor& rows) {
  return own_slices(
      pool.params, product(weights.transpose(1, 2), rows, rows.scalar_type(), pool.acc_dtype));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> score_softmax_by_operators(
    const at::Tensor& products, const at::Tensor& bias, const at::Tensor& keep, double scale) {
  const auto scores = scores_from(products, bias, keep, scale);  // [B, L, S]
  const auto max =
      products.size(1) > 0
          ? scores.amax(1)
          : at::full({products.size(0), products.size(2)}, kMinusInfinity, scores.options());
  const auto shift = at::where(max.eq(kMinusInfinity), at::zeros_like(max), max);
  const auto not_attended = scores.eq(kMinusInfinity);
  const auto exps = at::exp(scores - shift.unsqueeze(1));
  const auto sum = exps.sum(1);  // [B, S]
  // The row at the max adds exactly 1: a sum under 1 has nothing to attend.
  const auto attends = sum.ge(1).logical_or(sum.isnan());
  const auto weights = (exps / at::where(attends, sum, at::ones_like(sum)).unsqueeze(1))
                           .masked_fill(not_attended, 0);  // 0 there even when the sum is NaN
  const auto lse = at::stack(
      {at::where(attends, max, at::full_like(max, kMinusInfinity)),
       at::where(attends, at::log(sum), at::zeros_like(sum))},
      -1);
  return {weights, lse};
}

std::tuple<at::Tensor, at::Tensor> score_softmax_backward_by_operators(
    const at::Tensor& products,
    const at::Tensor& bias,
    const at::Tensor& keep,
    double scale,
    const at::Tensor& lse,
    const at::Tensor& dp) {
  const auto scores = scores_from(products, bias, keep, scale);  // as the forward made them
  const auto saved = lse.unsqueeze(1);                           // [B, 1, S, 2]
  const auto shifted = (scores - saved.select(3, 0)) - saved.select(3, 1);
  const auto probs = at::where(scores.eq(kMinusInfinity), at::zeros_like(scores), at::exp(shifted));
  const auto delta = (probs * dp).sum(1, /*keepdim=*/true);
  return {probs, (probs * scale) * (dp - delta)};
}

std::tuple<at::Tensor, at::Tensor> pool_forward_by_matmul(const PreparedForward& f) {
  // Under autocast the products would run in 16 bits.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const PreparedPool& pool = f.pool;
  const auto rows = attended_rows(pool);
  const auto [weights, lse] = score_softmax(pool, products_of(pool, rows));
  const auto out = weighted_rows(pool, weights, rows);
  return {out.reshape(pool.out_shape), lse.reshape(pool.lse_shape)};
}

std::tuple<at::Tensor, at::Tensor> pool_backward_by_matmul(const PreparedBackward& g) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const PreparedPool& pool = g.pool;
  const auto& p = pool.params;
  const auto rows = attended_rows(pool);
  // blocks[b, i * n + h] = G[b, i, D_h] (zeros past D_h): [B, S, H].
  const auto blocks = slice_blocks(p, g.grad_out.view({p.batch, p.num_queries, p.hidden}));
  // dp[b, l, i * n + h] = G[b, i, D_h] . rows[b, l, D_h]: [B, L, S].
  const auto dp = product(rows, blocks.transpose(1, 2), rows.scalar_type(), pool.acc_dtype);
  const auto lse = g.lse.reshape({p.batch, p.num_scores(), 2});
  const auto [probs, dscores] = score_softmax_backward(pool, products_of(pool, rows), lse, dp);
  // dx = sum_k ds_k u_k, + sum_i p[i, h] G[i, D_h] on each slice D_h.
  auto dx = at::matmul(dscores, pool.u);
  dx.baddbmm_(probs, blocks);
  const auto du = product(
      dscores.reshape({p.batch * p.seq_len, p.num_scores()}).t(),
      rows.reshape({p.batch * p.seq_len, p.hidden}),
      rows.scalar_type(),
      pool.acc_dtype);
  return {dx.to(rows.scalar_type()).contiguous(), du};
}

}  // namespace attnpool::detail
