#pragma once

// The softmax over each sequence's rows in the matrix-product path
// (ops/pool_by_matmul.h): two launches forward and two backward for what
// took some twenty tensor operators, each a launch with its own host time (on the
// H200 machine the path spent 0.3-0.5 ms a forward, far more than its
// products).
//
// score[b, l, s] = scale * product[b, l, s] + bias[b, l], rounded after the
// product and after the sum as the products' callers round it, or -inf where
// row l of sequence b is not attended. A block takes kSoftmaxColumns
// consecutive scores s of one piece of one sequence's rows (long sequences
// are cut so that a few sequences still fill the GPU); its threads are
// kSoftmaxColumns columns by kSoftmaxGroups groups of rows (group g takes the
// piece's rows g, g + kSoftmaxGroups, ...), so a warp reads 32 consecutive
// scores of one row. Each pass is two kernels: the first leaves each piece's
// state (running max and sum forward, sum of p * dp backward) in `partials`,
// the second merges the pieces' states and writes every row. Groups, then
// pieces, are merged in their order, so the results are the same at every
// launch.

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
  int64_t pieces;      // of each sequence's rows
  int64_t piece_rows;  // rows of a piece (the last may have fewer)
  acc_t* partials;     // [B, pieces, S, 2]
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

  ATTNPOOL_HOST_DEVICE int64_t column_blocks() const {
    return (num_scores + kSoftmaxColumns - 1) / kSoftmaxColumns;
  }
  ATTNPOOL_HOST_DEVICE int64_t blocks() const {
    return batch * pieces * column_blocks();
  }
  // Cuts each sequence into `count` pieces of equal rows (at least one).
  ATTNPOOL_HOST_DEVICE void cut(int64_t count) {
    piece_rows = seq_len > 0 ? (seq_len + count - 1) / count : 1;
    pieces = seq_len > 0 ? (seq_len + piece_rows - 1) / piece_rows : 1;
  }
};

// Bytes of shared memory of either kernel: two values per thread.
template <typename acc_t>
ATTNPOOL_HOST_DEVICE constexpr int64_t score_softmax_shared_bytes() {
  return static_cast<int64_t>(sizeof(acc_t)) * 2 * kSoftmaxThreads;
}

// The thread's place: sequence b, piece, score s (past the last score when
// !has_score), row group, and the piece's rows [begin, end).
struct SoftmaxPlace {
  int64_t b;
  int64_t piece;
  int64_t s;
  int64_t begin;
  int64_t end;
  int group;
  int column;
  bool has_score;
};

template <typename acc_t>
ATTNPOOL_DEVICE inline SoftmaxPlace softmax_place(const ScoreSoftmaxParams<acc_t>& a) {
  const int64_t columns = a.column_blocks();
  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);
  SoftmaxPlace place;
  place.b = block / (a.pieces * columns);
  place.piece = block / columns % a.pieces;
  place.column = tid % kSoftmaxColumns;
  place.group = tid / kSoftmaxColumns;
  place.s = block % columns * kSoftmaxColumns + place.column;
  place.has_score = place.s < a.num_scores;
  place.begin = place.piece * a.piece_rows;
  place.end = place.begin + a.piece_rows < a.seq_len ? place.begin + a.piece_rows : a.seq_len;
  return place;
}

// Where piece `piece`'s state of score s of sequence b is: 2 values.
template <typename acc_t>
ATTNPOOL_DEVICE inline acc_t* partial_at(
    const ScoreSoftmaxParams<acc_t>& a, int64_t b, int64_t piece, int64_t s) {
  return a.partials + ((b * a.pieces + piece) * a.num_scores + s) * 2;
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

// Forward, first pass: each piece's running max and sum of every score.
template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_state_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  RunningSoftmax<acc_t> state{-attnpool_infinity<acc_t>(), acc_t(0)};
  if (place.has_score) {
    for (int64_t l = place.begin + place.group; l < place.end; l += kSoftmaxGroups) {
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
  if (place.has_score && place.group == 0) {
    RunningSoftmax<acc_t> piece{-attnpool_infinity<acc_t>(), acc_t(0)};
    for (int g = 0; g < kSoftmaxGroups; ++g) {
      piece.merge(
          maxes[g * kSoftmaxColumns + place.column], sums[g * kSoftmaxColumns + place.column]);
    }
    acc_t* out = partial_at(a, place.b, place.piece, place.s);
    out[0] = piece.max;
    out[1] = piece.sum;
  }
}

// Forward, second pass: the pieces' states merged, the weights of the
// piece's rows, and (first piece) lse.
template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_weights_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  if (!place.has_score) {
    return;
  }
  RunningSoftmax<acc_t> total{-attnpool_infinity<acc_t>(), acc_t(0)};
  for (int64_t piece = 0; piece < a.pieces; ++piece) {
    const acc_t* state = partial_at(a, place.b, piece, place.s);
    total.merge(state[0], state[1]);
  }
  const bool attends = total.sum > acc_t(0) || total.sum != total.sum;
  const acc_t divisor = attends ? total.sum : acc_t(1);
  for (int64_t l = place.begin + place.group; l < place.end; l += kSoftmaxGroups) {
    const acc_t score = score_at(a, place.b, l, place.s);
    const int64_t i = (place.b * a.seq_len + l) * a.num_scores + place.s;
    a.weights[i] =
        score == -attnpool_infinity<acc_t>() ? acc_t(0) : attnpool_exp(score - total.max) / divisor;
  }
  if (place.piece == 0 && place.group == 0) {
    acc_t* lse = a.lse_out + (place.b * a.num_scores + place.s) * 2;
    lse[0] = total.max;
    lse[1] = attends ? attnpool_log(total.sum) : acc_t(0);
  }
}

// Backward, first pass: p of the piece's rows, and each piece's sum of p * dp.
template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_probs_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  acc_t part = acc_t(0);
  if (place.has_score) {
    const acc_t* lse = a.lse + (place.b * a.num_scores + place.s) * 2;
    const acc_t max = lse[0];
    const acc_t log_sum = lse[1];
    for (int64_t l = place.begin + place.group; l < place.end; l += kSoftmaxGroups) {
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
  if (place.has_score && place.group == 0) {
    acc_t piece = acc_t(0);
    for (int g = 0; g < kSoftmaxGroups; ++g) {
      piece += shared[g * kSoftmaxColumns + place.column];
    }
    partial_at(a, place.b, place.piece, place.s)[0] = piece;
  }
}

// Backward, second pass: delta from the pieces' sums, ds of the piece's rows.
template <typename acc_t>
ATTNPOOL_GLOBAL void score_softmax_dscores_kernel(ScoreSoftmaxParams<acc_t> a) {
  const SoftmaxPlace place = softmax_place(a);
  if (!place.has_score) {
    return;
  }
  acc_t delta = acc_t(0);
  for (int64_t piece = 0; piece < a.pieces; ++piece) {
    delta += partial_at(a, place.b, piece, place.s)[0];
  }
  for (int64_t l = place.begin + place.group; l < place.end; l += kSoftmaxGroups) {
    const int64_t i = (place.b * a.seq_len + l) * a.num_scores + place.s;
    a.dscores[i] = (a.probs[i] * a.scale) * (a.dp[i] - delta);
  }
}

}  // namespace attnpool::cuda
