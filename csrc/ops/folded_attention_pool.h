#pragma once

// What the CPU and CUDA entry points of folded_attention_pool share: the
// checked inputs in the form the kernels read them (ops/pool_params.h).

#include "ops/pool_params.h"

#include <ATen/core/Tensor.h>

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
    bool full_width);
std::tuple<at::Tensor, at::Tensor> call_folded_attention_pool_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width);

// The arguments of one call, checked. `params` points into the tensors held
// here, so it lives only as long as this struct.
struct PreparedPool {
  PoolInputs params;               // shape as the kernels see it, pointers set
  at::ScalarType acc_dtype;        // float64 for float64 x, else float32
  at::Tensor rows;                 // x with contiguous rows
  at::Tensor keep;                 // the mask as bool, or undefined
  at::Tensor u;                    // [num_scores, H] contiguous, accumulation dtype
  std::vector<int64_t> out_shape;  // the op's output shape
  std::vector<int64_t> lse_shape;  // [B, *u.shape[:-1]]
};
PreparedPool prepare_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width);

// What the backward reads besides the inputs, checked and made contiguous in
// the accumulation dtype.
struct PreparedGradients {
  at::Tensor grad_out;
  at::Tensor out;
  at::Tensor lse;
};
PreparedGradients prepare_gradients(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    bool full_width,
    at::ScalarType acc_dtype);

}  // namespace attnpool::detail
