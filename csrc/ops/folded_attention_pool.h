#pragma once

// What the CPU and CUDA entry points of folded_attention_pool share: the
// checked inputs in the form the kernels read them (ops/pool_params.h).

#include "ops/pool_params.h"

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace attnpool::detail {

// The private operators attnpool::_folded_attention_pool_forward and
// _backward, called through the dispatcher (by the composite and by the
// autograd kernel).
std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_forward(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);
std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// The arguments of one call, checked. `params` points into the tensors held
// here, so it lives only as long as this struct.
struct PreparedPool {
  PoolInputs params;               // shape as the kernels see it, pointers set
  at::ScalarType acc_dtype;        // float64 for float64 x, else float32
  at::Tensor rows;                 // x with contiguous rows
  at::Tensor keep;                 // the mask (and attn_bias != -inf) as bool, or undefined
  at::Tensor bias;                 // attn_bias [B, L] contiguous, accumulation dtype, or undefined
  at::Tensor u;                    // [num_scores, H] contiguous, accumulation dtype
  at::Tensor offsets;              // ragged: cu_seqlens as int64 [B + 1], else undefined
  std::vector<int64_t> out_shape;  // the op's output shape
  std::vector<int64_t> lse_shape;  // [B, *u.shape[:-1], 2]
  at::Tensor norm_weight;          // with a layer norm (set_norm): [H], accumulation dtype
  at::Tensor norm_bias;            // the same
};
PreparedPool prepare_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// Gives a prepared call the layer norm of _layer_norm_folded_attention_pool
// (checked): weight (or ones) and bias (or zeros) in the accumulation dtype.
void set_norm(
    PreparedPool& prepared,
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps);

// The gradient of a norm weight or bias as the layer-norm ops return it: in
// the parameter's dtype, or grad's own (the accumulation dtype) when it is
// absent; always a tensor of its own (grad may be a row of a larger one,
// which an operator's output must not alias).
at::Tensor norm_gradient(const at::Tensor& grad, const std::optional<at::Tensor>& param);

// layer_norm(x) over the last dimension, computed in the accumulation dtype
// and rounded to x's, as the fused kernels compute it.
at::Tensor layer_norm_rows(
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps);

// The private operators attnpool::_layer_norm_folded_attention_pool_forward
// and _backward (ops/layer_norm_folded_attention_pool.cpp).
std::tuple<at::Tensor, at::Tensor> call_layer_norm_pool_forward(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_layer_norm_pool_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// The op's output shape [B, (Q,) H], or full width [B, (Q,) n, H], and the
// log-sum-exp's [B, (Q,) n, 2], for x's batch and row width.
std::vector<c10::SymInt> out_sym_shape(
    const c10::SymInt& batch, const c10::SymInt& hidden, const at::Tensor& u, bool full_width);
std::vector<c10::SymInt> lse_sym_shape(const c10::SymInt& batch, const at::Tensor& u);

// Sets what prepare_pool derives from u (checked) and x's rows alone: the
// shape but seq_len, the scale, u in the accumulation dtype, out_shape and
// lse_shape.
void set_query(
    PreparedPool& prepared,
    const at::Tensor& x,
    int64_t batch,
    const at::Tensor& u,
    double scale,
    bool full_width);

// A forward call prepared: out and lse allocated in the accumulation dtype
// (out stays unrounded: the backward's delta = G . out needs it), params
// pointing at the inputs and outputs. The backend sets the cut and partials.
struct PreparedForward {
  PreparedPool pool;
  at::Tensor out;
  at::Tensor lse;
  ForwardParams params;
};
PreparedForward forward_from(PreparedPool pool, const at::Tensor& x);
PreparedForward prepare_forward(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// A backward call prepared: what it reads besides the inputs, checked and
// contiguous in the accumulation dtype; dx (x's dtype) and du ([num_scores,
// H], accumulation dtype) allocated; params pointing at all of them. The
// backend sets its cut and its buffers of partial sums.
struct PreparedBackward {
  PreparedPool pool;
  at::Tensor grad_out;
  at::Tensor out;
  at::Tensor lse;
  at::Tensor dx;
  at::Tensor du;
  at::Tensor norm_grads;  // with a layer norm: the gradients of its weight and bias [2, H]
  BackwardParams params;

  // (dx, du) as the op returns them: du shaped like u, in u's dtype.
  std::tuple<at::Tensor, at::Tensor> gradients(const at::Tensor& u) const;
};
PreparedBackward backward_from(
    PreparedPool pool,
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& out,
    const at::Tensor& lse);
PreparedBackward prepare_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// The same for a ragged batch (SPEC.md §6): x [T, H], cu_seqlens [B + 1].
// Offsets are checked on the CPU; on a GPU reading them would synchronise
// with the host, so there they are only clamped into [0, T] (the kernels
// never read outside x) and checked asynchronously.
std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_varlen_forward(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width);
std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_varlen_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width);
PreparedForward prepare_varlen_forward(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width);
PreparedBackward prepare_varlen_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width);

// first_piece [B + 1] of a ragged forward (ForwardParams): sequence b gets
// max(1, ceil(length / rows_per_piece)) pieces. On a GPU, tensor ops on the
// offsets' device, so no host synchronisation; on the CPU, a loop.
at::Tensor ragged_first_piece(const at::Tensor& offsets, int64_t rows_per_piece);

}  // namespace attnpool::detail
