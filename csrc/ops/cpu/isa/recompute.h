#pragma once

// The forward's softmax recomputed from its saved log-sum-exp, exactly as the
// forward computed it (same summation order, same rounding), so that a
// recomputed p never exceeds what the forward used: shared by the backward
// (isa/backward.h) and the jvp (isa/jvp.h). Per instruction set, like every
// file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/u_columns.h"
#include "ops/cpu/isa/vec_helpers.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// The scores of R rows in the order the forward summed them: natural, or for
// bfloat16 rows that the forward read in pairs, paired against u_paired (4
// rows at a time: 8 would take more registers than AVX2 has; each row's sum
// is the same either way).
template <int R, typename T, typename A>
void forward_order_scores(
    const T* const* rows, const A* u, const A* u_paired, int64_t n, A* scores) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (u_paired != nullptr) {
      if constexpr (R <= 4) {
        return paired_score_dot_rows<R>(rows, u_paired, n, scores);
      } else {
        paired_score_dot_rows<4>(rows, u_paired, n, scores);
        return forward_order_scores<R - 4>(rows + 4, u, u_paired, n, scores + 4);
      }
    }
  }
  score_dot_rows<R>(rows, u, n, scores);
}

// scores[k * R + r] = rows[r] . u_k for every score k, each summed as the
// forward summed it (forward_order_scores; from u_bf16, u rounded to
// bfloat16, if not null: [Note: bfloat16 products], and from u's tiles
// behind it where scores_on_tiles says so; by columns from u_columns, if not
// null: [Note: scores by columns]).
template <int R, typename T, typename A>
void forward_scores(
    const T* const* rows,
    const A* u,
    const A* u_paired,
    const at::BFloat16* u_bf16,
    const A* u_columns,
    int64_t n,
    int64_t num_scores,
    A* scores) {
  if constexpr (std::is_same_v<T, A>) {
    if (u_columns != nullptr) {
      return score_rows_by_columns(rows, R, u_columns, n, num_scores, scores);
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16> && kBFloat16Products) {
    if (u_bf16 != nullptr) {
      if (scores_on_tiles<T>(num_scores)) {
        return tile_scores_by_score(rows, R, u_bf16, n, num_scores, scores);
      }
      return score_dot_rows_each<R>(rows, u_bf16, n, num_scores, scores);
    }
  }
  if (u_paired == nullptr) {
    return score_dot_rows_each<R>(rows, u, n, num_scores, scores);
  }
  for (int64_t k = 0; k < num_scores; ++k) {
    forward_order_scores<R>(rows, u + k * n, u_paired + k * n, n, scores + k * R);
  }
}

// The score exactly as the forward made it: the product rounded, then the
// bias added (SoftmaxState::weigh_rows), so that p never exceeds what the
// forward's softmax used.
template <typename acc_t>
inline acc_t biased_score(acc_t scale, acc_t score, const acc_t* bias, int j) {
  const acc_t scaled = scale * score;
  return bias == nullptr ? scaled : scaled + bias[j];
}

// p = exp(score - max - log(sum)) from the forward's two parts of the
// log-sum-exp (pool_params.h). Kept apart, so that a score equal to the max
// gives exactly 1/sum even when the max is so large that max + log(sum)
// would round to max (e.g. a row whose every score got attn_bias = finfo.min).
template <typename acc_t>
inline acc_t probability(acc_t score, const acc_t* lse) {
  return exp_of((score - lse[0]) - lse[1]);
}

// scores[k * count + r] = probability(biased_score(...)) of every score k
// of `count` rows in place, lse: [num_scores, 2] of their sequence. The
// exponentials go in one vector pass: one std::exp at a time cost as much
// as the recomputed scores at 12-16 scores per row.
template <typename acc_t>
void probabilities(
    int count,
    acc_t scale,
    const acc_t* bias,
    const acc_t* lse,
    int64_t num_scores,
    acc_t* scores) {
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int r = 0; r < count; ++r) {
      const acc_t score = biased_score(scale, scores[k * count + r], bias, r);
      scores[k * count + r] = (score - lse[2 * k]) - lse[2 * k + 1];
    }
  }
  at::vec::map([](Vectorized<acc_t> v) { return exp_of(v); }, scores, scores, num_scores * count);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
