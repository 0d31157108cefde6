// attention_pool by projecting every key instead of folding the query
// (issue 14, item 3): with many queries and heads (CoCa's 256 x 8) the fold's
// Q·n multiply-adds per element of x cost more than the key projection's H.
// Built from ATen ops and two private ops of ours (the softmax and SDPA
// without subnormals), so every backend, autograd and Meta come with them.

#include "ops/attention_pool.h"

#include "ops/attention_without_subnormals.h"
#include "ops/autograd/forward_ad.h"
#include "ops/autograd/grad_mode.h"
#include "ops/checks.h"
#include "ops/cpu/kernel_set.h"
#include "ops/softmax_without_subnormals.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <limits>

namespace attnpool::detail {
namespace {

// [..., N, H] -> [..., n, N, d]: each head's slice of the width.
at::Tensor split_heads(const at::Tensor& t, int64_t num_heads) {
  return t.unflatten_symint(-1, {num_heads, t.sym_size(-1) / num_heads}).transpose(-3, -2);
}

// [B, n, Q, d] -> [B, Q, n * d]: split_heads undone.
at::Tensor merge_heads(const at::Tensor& t) {
  return t.transpose(1, 2).flatten(2);
}

// Whether the plain products, scores and softmax in acc, beat SDPA on this
// x. bfloat16 on the CPU: SDPA's CPU kernel ran CoCa's pooler (8 x 256 x
// 768, 256 queries x 8 heads, 2 threads, 2-core EPYC with AVX512-BF16)
// forward in 15.2 ms and forward+backward in 52.6; the products 14.6 and
// 44.2, with gradients 20% closer to float64 (the softmax's backward from
// p, its scores never rounded to bfloat16). With AMX (the CPU kernels'
// AMX_BF16 level: the CPU has the tiles and Linux lets the process use them)
// SDPA multiplies on the tiles: on a 2-core Xeon, forward 5.0 ms against the
// products' 12.1, forward+backward 27.7 against 29.2. So SDPA serves
// bfloat16 there when no gradient is asked for; training keeps the float32
// scores and their closer gradients, and inference below AMX takes them a
// sequence at a time (pool_sequence_by_sequence, as for any exact scores on
// the CPU, a bias's included). float32 stays with SDPA (28 ms forward against
// 49 on the EPYC; a sequence at a time 26.8 against 25.6, the key
// projection included), float16 too (73 against 203; forward+backward
// alike). At scores 30 apart, where many weights go subnormal, SDPA's CPU
// backward took CoCa's pooler's float32 forward+backward from 55 ms to 348
// (2-core Xeon with AMX); with subnormals flushed there
// (attention_without_subnormals) 56 at scores 1, 10 and 30 apart. The
// products, whose softmax sets those weights to 0, are level too, but saved
// twice the bytes for the backward (the weights [B, n, Q, L]: 39 MiB
// against 19) and ran 0.96-0.98x SDPA's speed at scores 1 apart.
bool products_are_faster(const at::Tensor& x, bool needs_grad) {
  if (!x.is_cpu() || x.scalar_type() != at::kBFloat16) {
    return false;
  }
  return needs_grad || cpu::selected_kernels().isa != cpu::Isa::AMX_BF16;
}

// Each head's projected queries [n, Q, d] in acc, times the scale: the
// scores come out of their product scaled, which saved a pass over them
// forward and backward (CoCa's pooler, bfloat16 forward+backward against
// SDPA's, 2 threads, 2-core Xeon with AMX: 0.88, 0.86 -> 0.93, 0.89 in two
// grid runs each).
at::Tensor scaled_head_queries(
    const at::Tensor& projected, int64_t num_heads, double scale, at::ScalarType acc) {
  return split_heads(projected.to(acc), num_heads) * scale;
}

// The products with scores in acc (float32 for bfloat16) for inference on
// the CPU, one sequence at a time, all heads at once: a sequence's scores
// [n, Q, L] stay in cache through the softmax and the rounding, which for
// the whole batch's [B, n, Q, L] each went to memory and back. The same
// products in the same order as the batch's. CoCa's pooler (8 x 256 x 768,
// 256 queries x 8 heads, bfloat16, 2 threads, 2-core EPYC with
// AVX512-BF16): the op's forward 17.0 ms, against 21.5 with the batch at
// once and 19.6 for the composition that calls SDPA. queries:
// [n, Q, d] in acc, scaled (scaled_head_queries); keys, values: [B, n, L, d];
// additive: [B, 1, 1, L] or undefined. Out: [B, Q, H].
at::Tensor pool_sequence_by_sequence(
    const at::Tensor& queries,
    const at::Tensor& keys,
    const at::Tensor& values,
    const at::Tensor& additive) {
  const int64_t batch = values.size(0);
  const int64_t num_heads = values.size(1);
  const int64_t num_queries = queries.size(1);
  const int64_t head_dim = values.size(3);
  auto out = at::empty({batch, num_queries, num_heads * head_dim}, values.options());
  for (int64_t b = 0; b < batch; ++b) {
    auto scores = at::matmul(queries, keys[b].to(queries.scalar_type()).transpose(-1, -2));
    if (additive.defined()) {
      scores.add_(additive[b]);
    }
    const auto probs = softmax_without_subnormals(scores).to(values.scalar_type());
    // [Q, H] seen as [n, Q, d]: each head's sums land in their columns.
    auto heads_out = out[b].view({num_queries, num_heads, head_dim}).transpose(0, 1);
    at::matmul_out(heads_out, probs, values[b]);
  }
  return out;
}

}  // namespace

bool projecting_keys_is_cheaper(int64_t num_queries, int64_t num_heads, int64_t hidden) {
  // Multiply-adds per element of x (SPEC.md §5): the fold scores Q·n times
  // and sums Q times; projecting costs H for the key, then Q for the scores
  // (each query meets each head's d dims once) and Q for the sums.
  return num_queries * num_heads > hidden + num_queries;
}

at::Tensor pool_by_projection(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    double scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  // x: [B, L, H]; query: [H] or [Q, H]; w_q, w_k: [H, H]. Out: [B, (Q,) H].
  // Under autocast these products would run in float16/bfloat16 and return
  // them; the op computes in x's dtype in any region, as the fold does.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const c10::SymInt batch = x.sym_size(0);
  const auto queries = query.dim() == 1 ? query.unsqueeze(0) : query;
  const c10::SymInt num_queries = queries.sym_size(0);
  const auto acc = accumulate_dtype(x.scalar_type());
  const bool masked = mask.has_value() || attn_bias.has_value() || lengths.has_value();
  // SDPA has no forward-mode AD (a tangent reaches here only through the
  // autograd kernel), and takes a bias in x's dtype, which would round a
  // bias that the fold adds in float32. Nor does its backward take any
  // bias exactly: it rebuilds p from a log-sum-exp, max + log(sum), which
  // for a row whose every bias is finfo.min (as peers pad, a uniform
  // average) rounds back to finfo.min, so p = 1 where the softmax gave 1/L
  // (gradients L times too large). The softmax's own backward uses p.
  const bool with_tangents = any_tangent({&x, &query, &w_q, &w_k}, attn_bias);
  const bool needs_grad = any_needs_grad({&x, &query, &w_q, &w_k});
  const bool exact_scores =
      with_tangents || attn_bias.has_value() || products_are_faster(x, needs_grad);

  at::Tensor rows = x;
  at::Tensor any_attended;  // [B] bool, when masked
  at::Tensor additive;      // [B, 1, 1, L] in acc, when masked
  if (masked) {
    const auto keep = attended_positions(x, mask, attn_bias, lengths);
    any_attended = keep.any(/*dim=*/1);
    // Positions that do not count are never read: NaN there stays out.
    rows = x.masked_fill(keep.logical_not().unsqueeze(-1), 0);
    auto bias = attn_bias.has_value() ? attn_bias->to(acc)
                                      : at::zeros_symint(keep.sym_sizes(), x.options().dtype(acc));
    // A row with nothing to attend attends everywhere (finite forward and
    // backward) and is zeroed at the end.
    bias = bias.masked_fill(
        keep.logical_not() & any_attended.unsqueeze(1), -std::numeric_limits<double>::infinity());
    additive =
        bias.masked_fill(any_attended.logical_not().unsqueeze(1), 0).unsqueeze(1).unsqueeze(1);
  }

  const auto projected = at::linear(queries, w_q);  // [Q, H]
  const auto keys =
      split_heads(at::linear(rows, w_k.to(x.scalar_type())), num_heads);  // [B, n, L, d]
  const auto values = split_heads(rows, num_heads);                       // [B, n, L, d]
  at::Tensor out;                                                         // [B, Q, H]
  if (exact_scores && !needs_grad && !with_tangents && x.is_cpu()) {
    out = pool_sequence_by_sequence(
        scaled_head_queries(projected, num_heads, scale, acc),
        keys,
        values,
        masked ? additive : at::Tensor());
  } else if (exact_scores) {
    // Scores and softmax in acc (a bias added in float32, SPEC.md §2), and
    // plain differentiable ops: forward-mode AD has them all.
    auto scores = at::matmul(
        scaled_head_queries(projected, num_heads, scale, acc),
        keys.to(acc).transpose(-1, -2));  // [B, n, Q, L]
    if (masked) {
      scores = scores + additive;
    }
    out = merge_heads(at::matmul(softmax_without_subnormals(scores).to(x.scalar_type()), values));
  } else {
    const auto q = split_heads(projected.to(x.scalar_type()), num_heads)
                       .unsqueeze(0)
                       .expand_symint({batch, num_heads, num_queries, -1});
    const auto attn_mask =
        masked ? std::optional<at::Tensor>(additive.to(x.scalar_type())) : std::nullopt;
    // On the CPU, SDPA's backward with subnormals flushed (float32 CoCa's
    // pooler at scores 30 apart, forward+backward: 348 -> 56 ms, as at 1).
    out = merge_heads(
        x.is_cpu()
            ? attention_without_subnormals(q, keys, values, attn_mask, scale)
            : at::scaled_dot_product_attention(
                  q, keys, values, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale));
  }
  if (masked) {
    out = at::where(any_attended.unsqueeze(1).unsqueeze(2), out, at::zeros({}, out.options()));
  }
  return query.dim() == 1 ? out.squeeze(1) : out;
}

}  // namespace attnpool::detail
