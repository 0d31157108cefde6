#pragma once

// The softmax over each sequence's rows in the matrix-product path
// (ops/pool_by_matmul.h): one launch forward and one backward for what took
// some twenty tensor operators, each a launch with its own host time (on the
// H200 machine the path spent 0.3-0.5 ms a forward, far more than its
// products).
//
// score[b, l, s] = scale * product[b, l, s] + bias[b, l], rounded after the
// product and after the sum as the products' callers round it, or -inf where
// row l of sequence b is not attended. A block takes kSoftmaxColumns
// consecutive scores s of one sequence; its threads are kSoftmaxColumns
// columns by kSoftmaxGroups groups of rows (group g takes rows g, g +
// kSoftmaxGroups, ...), so a warp reads 32 consecutive scores of one row.
// Each thread keeps a running max and sum; the groups' states, and the
// backward's partial sums, are merged in group order, so the results are
// the same at every launch.

#include "ops/cuda/cuda_compat.h"

#include <cstdint>

namespace attnpool::cuda {

constexpr int kSoftmaxColumns = 32;
constexpr int kSoftmaxGroups = 8;
constexpr int kSoftmaxThreads = kSoftmaxColumns * kSoftmaxGroups;

template <typename acc_t>
struct ScoreSoftmaxParams {
  const acc_t* product;  // [B, L, S]
  const acc_t* bias;     // [B, L] or null
  const bool* keep;      // [B, L], true where attended, or null
  acc_t scale;
  int64_t batch;
  int64_t seq_len;
  int64_t num_scores;
  // Forward: the weights [B, L, S] and lse_out [B, S, 2] (max, log of the
  // sum; -inf and 0 for a sequence with nothing to attend).
  acc_t* weights;
  acc_t* lse_out;
  // Backward: from the forward's lse and dp [B, L, S], p and
  // ds = p * scale * (dp - delta) [B, L, S], where delta = sum_l p * dp.
  const acc_t* lse;
  const acc_t* dp;
  acc_t* probs;
  acc_t* dscores;

  ATTNPOOL_HOST_DEVICE int64_t blocks_per_sequence() const {
    return (num_scores + kSoftmaxColumns - 1) / kSoftmaxColumns;
  }
  ATTNPOOL_HOST_DEVICE int64_t blocks() const {
    return batch * blocks_per_sequence();
  }
};

// Bytes of shared memory of either kernel: two values per thread.
template <typename acc_t>
ATTNPOOL_HOST_DEVICE constexpr int64_t score_softmax_shared_bytes() {
  return static_cast<int64_t>(sizeof(acc_t)) * 2 * kSoftmaxThreads;
}

// The thread's place: sequence b, score s (past the last score when
// !has_score), row group.
struct SoftmaxPlace {
  int64_t b;
  int64_t s;
  int group;
  int column;
  bool has_score;
};

template <typename acc_t>
ATTNPOOL_DEVICE inline SoftmaxPlace softmax_place(const ScoreSoftmaxParams<acc_t>& a) {
  const int64_t per_sequence = a.blocks_per_sequence();
  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);
  SoftmaxPlace place;
  place.b = block / per_sequence;
  place.column = tid % kSoftmaxColumns;
  place.group = tid / kSoftmaxColumns;
  place.s = (block % per_sequence) * kSoftmaxColumns + place.column;
  place.has_score = place.s < a.num_scores;
  return place;
}

template <typename acc_t>
ATTNPOOL_DEVICE inline acc_t score_at(
    const ScoreSoftmaxParams<acc_t>& a, int64_t b, int64_t l, int64_t s) {
  const int64_t row = b * a.seq_len + l;
  if (a.keep != nullptr && !a.keep[row]) {
    return -attnpool_infinity<acc_t>();
  }
  const acc_t scaled = attnpool_mul_rn(a.scale, a.product[row * a.num_scores + s]);
  return a.bias == nullptr ? scaled : scaled + a.bias[row];
}

// Running max and sum of exp(score - max) over some rows; max -inf and sum
// 0 for none. The row that sets the final max adds exactly 1 to the sum, so
// the sum of a sequence with a row to attend is at least 1.
template <typename acc_t>
struct RunningSoftmax {
  acc_t max;
  acc_t sum;

  ATTNPOOL_DEVICE void add(acc_t score) {
    if (score == -attnpool_infinity<acc_t>()) {
      return;
    }
    if (score > max || score != score) {  // a NaN score makes max and sum NaN
      sum = sum * attnpool_exp(max - score) + acc_t(1);
      max = score;
    } else {
      sum += attnpool_exp(score - max);
    }
  }

  ATTNPOOL_DEVICE void merge(acc_t other_max, acc_t other_sum) {
    if (other_max == -attnpool_infinity<acc_t>()) {
      return;
    }
    if (max == -attnpool_infinity<acc_t>()) {
      max = other_max;
      sum = other_sum;
      return;
    }
    const acc_t top = other_max > max || other_max != other_max ? other_max : max;
    sum = sum * attnpool_exp(max - top) + other_sum * attnpool_exp(other_max - top);
    max = top;
  }
};

template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_forward_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  RunningSoftmax<acc_t> state{-attnpool_infinity<acc_t>(), acc_t(0)};
  if (place.has_score) {
    for (int64_t l = place.group; l < a.seq_len; l += kSoftmaxGroups) {
      state.add(score_at(a, place.b, l, place.s));
    }
  }
  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* maxes = shared;                   // [groups][columns]
  acc_t* sums = shared + kSoftmaxThreads;  // [groups][columns]
  const int slot = place.group * kSoftmaxColumns + place.column;
  maxes[slot] = state.max;
  sums[slot] = state.sum;
  attnpool_syncthreads();
  if (!place.has_score) {
    return;
  }
  // Every thread of the column merges its groups in the same order.
  RunningSoftmax<acc_t> total{-attnpool_infinity<acc_t>(), acc_t(0)};
  for (int g = 0; g < kSoftmaxGroups; ++g) {
    total.merge(
        maxes[g * kSoftmaxColumns + place.column], sums[g * kSoftmaxColumns + place.column]);
  }
  const bool attends = total.sum > acc_t(0) || total.sum != total.sum;
  const acc_t divisor = attends ? total.sum : acc_t(1);
  for (int64_t l = place.group; l < a.seq_len; l += kSoftmaxGroups) {
    const acc_t score = score_at(a, place.b, l, place.s);
    const int64_t i = (place.b * a.seq_len + l) * a.num_scores + place.s;
    a.weights[i] =
        score == -attnpool_infinity<acc_t>() ? acc_t(0) : attnpool_exp(score - total.max) / divisor;
  }
  if (place.group == 0) {
    acc_t* lse = a.lse_out + (place.b * a.num_scores + place.s) * 2;
    lse[0] = total.max;
    lse[1] = attends ? attnpool_log(total.sum) : acc_t(0);
  }
}

template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_backward_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  acc_t part = acc_t(0);
  if (place.has_score) {
    const acc_t* lse = a.lse + (place.b * a.num_scores + place.s) * 2;
    const acc_t max = lse[0];
    const acc_t log_sum = lse[1];
    for (int64_t l = place.group; l < a.seq_len; l += kSoftmaxGroups) {
      const acc_t score = score_at(a, place.b, l, place.s);
      const int64_t i = (place.b * a.seq_len + l) * a.num_scores + place.s;
      const acc_t p =
          score == -attnpool_infinity<acc_t>() ? acc_t(0) : attnpool_exp((score - max) - log_sum);
      a.probs[i] = p;
      part += p * a.dp[i];
    }
  }
  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);  // [groups][columns]
  shared[place.group * kSoftmaxColumns + place.column] = part;
  attnpool_syncthreads();
  if (!place.has_score) {
    return;
  }
  acc_t delta = acc_t(0);
  for (int g = 0; g < kSoftmaxGroups; ++g) {
    delta += shared[g * kSoftmaxColumns + place.column];
  }
  for (int64_t l = place.group; l < a.seq_len; l += kSoftmaxGroups) {
    const int64_t i = (place.b * a.seq_len + l) * a.num_scores + place.s;
    a.dscores[i] = (a.probs[i] * a.scale) * (a.dp[i] - delta);
  }
}

}  // namespace attnpool::cuda
