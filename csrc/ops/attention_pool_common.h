#pragma once

// Device-independent pieces of attention_pool shared by the CPU, CUDA and
// Meta kernels: argument checks, the default scale, and the fold of the
// query into score vectors u (SPEC.md §1) together with its backward.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace attnpool::detail {

// Sizes of one call, read after the arguments were checked.
struct PoolDims {
  int64_t batch;        // B
  int64_t seq_len;      // L
  int64_t hidden;       // H
  int64_t num_queries;  // Q (1 for a 1-D query)
  int64_t num_heads;    // n
  int64_t head_dim;     // d = H / n

  int64_t num_scores() const {
    return num_queries * num_heads;
  }
};

// Throws a c10::ValueError (or c10::TypeError for dtypes) naming the argument,
// what was expected and what was given. Works on real and Meta tensors
// (symbolic sizes), so compile-time shape errors match run-time ones.
void check_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale);

// Extra checks of the backward op: grad_out, out and lse must have the shapes
// the forward op produced for these arguments.
void check_attention_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads);

PoolDims pool_dims(const at::Tensor& x, const at::Tensor& query, int64_t num_heads);

// 1/sqrt(head_dim) unless the caller gave a scale.
double resolve_scale(std::optional<double> scale, int64_t head_dim);

// Accumulation dtype of the kernels: float64 for float64 x, else float32.
at::ScalarType accumulate_dtype(at::ScalarType x_dtype);

// The mask as a bool tensor (nonzero = attend), or an undefined tensor.
at::Tensor bool_mask(const std::optional<at::Tensor>& mask);

// x itself when its rows are contiguous (stride(2) == 1), else a contiguous copy.
at::Tensor with_contiguous_rows(const at::Tensor& x);

// q' = query @ w_q.T and the per-(query, head) score vectors
// u[i, h] = w_k[D_h, :].T @ q'[i, D_h], both in the accumulation dtype.
struct FoldedQuery {
  at::Tensor projected_query;  // q': [Q, H]
  at::Tensor score_vectors;    // u:  [Q * n, H], row i * n + h
};
FoldedQuery fold_query(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    at::ScalarType acc_dtype);

// Gradients of query, w_q and w_k from du = dLoss/du ([Q * n, H]), in the
// parameters' dtype.
struct ParamGrads {
  at::Tensor query;
  at::Tensor w_q;
  at::Tensor w_k;
};
ParamGrads unfold_score_vector_grad(
    const at::Tensor& grad_score_vectors,
    const FoldedQuery& folded,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads);

// fold_query or a device's own kernel for it (the CPU has one).
using QueryFolder = FoldedQuery (*)(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    at::ScalarType acc_dtype);

// The arguments of one call, checked, in the form every kernel reads them.
struct PreparedInputs {
  PoolDims dims;
  at::ScalarType acc_dtype;
  double scale;                       // resolved: the given one or 1/sqrt(head_dim)
  FoldedQuery folded;                 // u in the accumulation dtype
  at::Tensor rows;                    // x with contiguous rows
  at::Tensor keep;                    // the mask as bool, or undefined
  std::vector<int64_t> output_shape;  // [B, H] for a 1-D query, else [B, Q, H]
};
PreparedInputs prepare_inputs(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    QueryFolder fold = &fold_query);

// Points a kernel's argument struct at the inputs. The CPU params and the
// CUDA args name these fields alike.
template <typename Args>
void set_input_args(Args& a, const PreparedInputs& in) {
  a.x = in.rows.const_data_ptr();
  a.x_batch_stride = in.rows.stride(0);
  a.x_seq_stride = in.rows.stride(1);
  a.mask = in.keep.defined() ? in.keep.template const_data_ptr<bool>() : nullptr;
  a.mask_batch_stride = in.keep.defined() ? in.keep.stride(0) : 0;
  a.mask_seq_stride = in.keep.defined() ? in.keep.stride(1) : 0;
  a.u = in.folded.score_vectors.const_data_ptr();
  a.scale = in.scale;
}

// What the backward reads besides the inputs, checked and made contiguous
// in the accumulation dtype.
struct PreparedGradients {
  at::Tensor grad_out;  // [B, Q, H] layout
  at::Tensor out;       // [B, Q, H] layout
  at::Tensor lse;       // [B, Q, n]
};
PreparedGradients prepare_gradients(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads,
    at::ScalarType acc_dtype);

}  // namespace attnpool::detail
