#pragma once

// Interface between the CPU entry points (attention_pool_kernel.cpp, compiled
// once) and the compute kernels (isa/attention_pool_kernel_*.cpp, compiled
// once per instruction set). Only plain data crosses it: the kernels see raw
// pointers and sizes, never at::Tensor, so nothing that depends on the
// instruction set leaks into code shared by all of them.

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace attnpool::cpu {

struct PoolShape {
  int64_t batch;        // B
  int64_t seq_len;      // L
  int64_t hidden;       // H
  int64_t num_queries;  // Q
  int64_t num_heads;    // n; score k = i * n + h
};

// How the work is cut. It depends on the shape only, never on the number of
// threads, so results are bitwise identical for any thread count.
struct WorkPlan {
  int64_t splits;          // forward: pieces of each sequence (1 = no split)
  int64_t rows_per_split;  // forward: rows of x per piece
  int64_t rows_per_item;   // backward: rows of the flattened [B * L] per item
  int64_t items;           // backward: number of items (= partial du buffers)
  int64_t forward_grain;   // fewest forward items worth a thread of their own
  int64_t backward_grain;  // fewest backward items worth a thread of their own
};

// x: [B, L, H] rows contiguous; u: [Q*n, H] contiguous accumulation dtype;
// mask: [B, L] bool, or null; out: [B, Q, H] contiguous accumulation dtype;
// lse: [B, Q*n] contiguous accumulation dtype;
// partials: [B * splits, 1 + 2*Q*n + Q*H] accumulation dtype when splits > 1.
struct ForwardParams {
  PoolShape shape;
  WorkPlan plan;
  c10::ScalarType dtype;
  const void* x;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;
  const void* u;
  double scale;
  void* out;
  void* lse;
  void* partials;
};

// grad_out, out: [B, Q, H] contiguous accumulation dtype; dx: [B, L, H]
// contiguous x dtype; workspaces in the accumulation dtype: delta [B, Q*n]
// (sum of grad_out * out over each head's dims), du_partials [items, Q*n, H];
// du: [Q*n, H] output.
struct BackwardParams {
  PoolShape shape;
  WorkPlan plan;
  c10::ScalarType dtype;
  const void* x;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;
  const void* u;
  double scale;
  const void* grad_out;
  const void* out;
  const void* lse;
  void* delta;
  void* dx;
  void* du_partials;
  void* du;
  // Write dx with non-temporal stores: set when dx is float32/float64, its
  // rows are 64-byte aligned and its memory is already backed by pages.
  bool stream_dx;
};

// The fold (SPEC.md §1) and its backward cut the rows of w_q and w_k the
// same way: each head's d rows into runs_per_head runs, one task per
// (head, run), task = h * runs_per_head + run. The cut depends on the shape
// only, like WorkPlan.
struct FoldShape {
  int64_t hidden;         // H
  int64_t num_queries;    // Q
  int64_t num_heads;      // n
  int64_t runs_per_head;  // >= 1

  int64_t tasks() const {
    return num_heads * runs_per_head;
  }
};

// Everything in the accumulation dtype (float or double), contiguous:
// query [Q, H], w_q and w_k [H, H]; outputs projected = q' [Q, H] and
// u [Q*n, H]; partials [runs_per_head, Q*n, H] when runs_per_head > 1.
struct FoldParams {
  FoldShape shape;
  c10::ScalarType dtype;
  const void* query;
  const void* w_q;
  const void* w_k;
  void* projected;
  void* u;
  void* partials;
};

// The fold's backward, from grad_u = dLoss/du [Q*n, H]; inputs as in
// FoldParams plus projected [Q, H]; outputs grad_query [Q, H], grad_w_q and
// grad_w_k [H, H]; partials [tasks, Q, H] when there is more than one task.
struct UnfoldParams {
  FoldShape shape;
  c10::ScalarType dtype;
  const void* query;
  const void* w_q;
  const void* w_k;
  const void* projected;
  const void* grad_u;
  void* grad_query;
  void* grad_w_q;
  void* grad_w_k;
  void* partials;
};

using ForwardFn = void (*)(const ForwardParams&);
using BackwardFn = void (*)(const BackwardParams&);
using FoldFn = void (*)(const FoldParams&);
using UnfoldFn = void (*)(const UnfoldParams&);

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

struct KernelSet {
  Isa isa;
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
  FoldFn fold;
  UnfoldFn unfold;
};

// Each isa/ translation unit registers its KernelSet from a static
// initializer; the best one the CPU supports is picked on first use.
bool register_kernels(const KernelSet& kernels);
const KernelSet& selected_kernels();

}  // namespace attnpool::cpu
