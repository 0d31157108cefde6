#pragma once

// fold_query and its backward on the CPU: one parallel pass over the rows
// of w_q and w_k, read together, partial sums added in a fixed order.
// Per instruction set, like every file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/vec_helpers.h"
#include "ops/cpu/kernel_set.h"

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// Calls f(task, rows) for every task of the fold's cut (FoldShape): the rows
// of w_q and w_k that task reads. Tasks are spread over the threads.
template <typename F>
void for_each_fold_task(const FoldShape& s, const F& f) {
  const int64_t head_rows = s.proj_dim / s.num_heads;
  at::parallel_for(0, s.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / s.head_cut.pieces;
      const RowRange rows = s.head_cut.piece(task % s.head_cut.pieces, head_rows);
      f(task, RowRange{h * head_rows + rows.begin, h * head_rows + rows.end});
    }
  });
}

// Asks for row j + 2 of a weight with rows of `width` while row j is read.
// Without it the fold read its two weights about 10% slower.
template <typename T>
void prefetch_weight_row(const T* w, int64_t j, int64_t width) {
  prefetch_row(w + j * width, width, 2 * width);
}

// projected[i, j] = query[i] . w_q[j] + q_bias[j], and u[i*n + h] = sum over
// j in D_h of projected[i, j] * w_k[j], in one parallel pass that reads row j
// of both weights together. A head cut into several pieces sums the pieces'
// partial u in order at the end. (Two at::matmul calls, or a pass over w_q
// and then one over w_k cut by columns, took about twice as long as reading
// both weights: at BERT size 10-15% of the whole forward.)
// T: the weights' dtype (FoldParams::weights), A: the accumulation dtype.
template <typename T, typename A>
void fold_impl(const FoldParams& p) {
  const int64_t Hq = p.query_dim;
  const int64_t Hx = p.x_dim;
  const int64_t Q = p.num_queries;
  const int64_t n = p.num_heads;
  const int64_t num_scores = Q * n;
  const auto* query = static_cast<const A*>(p.query);
  const auto* w_q = static_cast<const T*>(p.w_q);
  const auto* w_k = static_cast<const T*>(p.w_k);
  const auto* q_bias = static_cast<const A*>(p.q_bias);
  auto* projected = static_cast<A*>(p.projected);
  auto* partials = static_cast<A*>(p.partials);
  const bool in_pieces = p.head_cut.pieces > 1;
  auto* u = in_pieces ? partials : static_cast<A*>(p.u);

  for_each_fold_task(p, [&](int64_t task, RowRange rows) {
    const int64_t h = task / p.head_cut.pieces;
    A* sums = u + (in_pieces ? task % p.head_cut.pieces * num_scores * Hx : 0);
    for (int64_t i = 0; i < Q; ++i) {
      std::fill_n(sums + (i * n + h) * Hx, Hx, A(0));
    }
    for (int64_t j = rows.begin; j < rows.end; ++j) {
      prefetch_weight_row(w_q, j, Hq);
      prefetch_weight_row(w_k, j, Hx);
      const T* w_k_row = w_k + j * Hx;
      for (int64_t i = 0; i < Q; ++i) {
        const A z = dot(w_q + j * Hq, query + i * Hq, Hq) + (q_bias ? q_bias[j] : A(0));
        projected[i * p.proj_dim + j] = z;
        axpy_rows<1>(&z, &w_k_row, sums + (i * n + h) * Hx, Hx);
      }
    }
  });
  if (in_pieces) {
    sum_parts_in_order(partials, p.head_cut.pieces, num_scores * Hx, static_cast<A*>(p.u));
  }
}

// The fold's backward in the same cut, one pass over row j of both weights
// (h the head of row j):
//   dq'[i, j] = grad_u[i*n + h] . w_k[j]
//   grad_w_k[j] = sum_i q'[i, j] * grad_u[i*n + h]
//   grad_w_q[j] = sum_i dq'[i, j] * query[i],  grad_q_bias[j] = sum_i dq'[i, j]
//   grad_query[i] = sum_j dq'[i, j] * w_q[j]      (a partial per task)
// Matmuls here gave gradients that changed with the number of threads.
template <typename T>
void fold_backward_impl(const FoldBackwardParams& p) {
  const int64_t Hq = p.query_dim;
  const int64_t Hx = p.x_dim;
  const int64_t Q = p.num_queries;
  const int64_t n = p.num_heads;
  const auto* query = static_cast<const T*>(p.query);
  const auto* w_q = static_cast<const T*>(p.w_q);
  const auto* w_k = static_cast<const T*>(p.w_k);
  const auto* projected = static_cast<const T*>(p.projected);
  const auto* grad_u = static_cast<const T*>(p.grad_u);
  auto* grad_w_q = static_cast<T*>(p.grad_w_q);
  auto* grad_w_k = static_cast<T*>(p.grad_w_k);
  auto* grad_q_bias = static_cast<T*>(p.grad_q_bias);
  const bool in_parts = p.tasks() > 1;
  auto* grad_query = in_parts ? static_cast<T*>(p.partials) : static_cast<T*>(p.grad_query);

  for_each_fold_task(p, [&](int64_t task, RowRange rows) {
    const int64_t h = task / p.head_cut.pieces;
    T* query_sums = grad_query + (in_parts ? task * Q * Hq : 0);
    std::fill_n(query_sums, Q * Hq, T(0));
    for (int64_t j = rows.begin; j < rows.end; ++j) {
      prefetch_weight_row(w_q, j, Hq);
      prefetch_weight_row(w_k, j, Hx);
      T* const w_k_grad_row = grad_w_k + j * Hx;
      T* const w_q_grad_row = grad_w_q + j * Hq;
      const T* w_q_row = w_q + j * Hq;
      T bias_grad = T(0);
      for (int64_t i = 0; i < Q; ++i) {
        const T* du = grad_u + (i * n + h) * Hx;
        const T dq = dot(w_k + j * Hx, du, Hx);
        const T q = projected[i * p.proj_dim + j];
        if (i == 0) {
          scaled_into_rows<1, false>(&q, du, &w_k_grad_row, Hx);
          scaled_into_rows<1, false>(&dq, query, &w_q_grad_row, Hq);
        } else {
          scaled_into_rows<1, true>(&q, du, &w_k_grad_row, Hx);
          scaled_into_rows<1, true>(&dq, query + i * Hq, &w_q_grad_row, Hq);
        }
        axpy_rows<1>(&dq, &w_q_row, query_sums + i * Hq, Hq);
        bias_grad += dq;
      }
      grad_q_bias[j] = bias_grad;
    }
  });
  if (in_parts) {
    sum_parts_in_order(grad_query, p.tasks(), Q * Hq, static_cast<T*>(p.grad_query));
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
